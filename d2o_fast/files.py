"""File plumbing every layer shares: content hashes, and the one way this project writes a file atomically."""

import contextlib
import hashlib
import json
import os
import secrets
import stat


def file_sha256(path, chunk_bytes=1 << 20):
    """Hex sha256 of a file's bytes, read in chunks (checkpoints reach a few GB)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b''):
            digest.update(chunk)
    return digest.hexdigest()


def sources_sha256(root, suffix='.py'):
    """Hex sha256 of every file under `root` whose name ends with `suffix` (a string or a tuple of them): their
    relative paths and bytes, in sorted order."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(suffix)):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b'\0' + file_sha256(path).encode())
    return digest.hexdigest()


def _new_temporary(directory, name):
    """(path, mode) of a new empty file next to the destination; the mode is what the umask gives any new file."""
    for _ in range(100):
        tmp = os.path.join(directory, f'.{name}.{secrets.token_hex(4)}.tmp')
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:  # no such folder, no permission, ...: name the file the caller asked for
            raise type(e)(e.errno, f'{e.strerror}: cannot create {os.path.join(directory, name)}') from None
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f'cannot create a temporary file for {name} in {directory}')


def _fsync_directory(directory):
    with contextlib.suppress(OSError):  # makes the rename durable; not every file system supports it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path` to write the file at; when the block succeeds, fsync the file and
    rename it over `path` (then fsync the folder).

    Readers never see a half-written file, and a failure or crash leaves the previous file untouched. The file
    gets the permissions of any other file the process creates (0666 less the umask), even when the writer
    replaced the temporary file with one of its own (safetensors makes it 0600).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp, mode = _new_temporary(directory, os.path.basename(path))
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def write_text(path, text):
    """Write `text` to `path` atomically (atomic_path)."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


def write_json(path, payload, indent=2):
    """Write `payload` as JSON to `path` atomically (atomic_path)."""
    write_text(path, json.dumps(payload, indent=indent) + '\n')


__all__ = ['file_sha256', 'sources_sha256', 'atomic_path', 'write_text', 'write_json']
