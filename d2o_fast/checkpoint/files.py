"""File plumbing shared by checkpoint readers and writers: content hashes, atomic writes."""

import contextlib
import hashlib
import os
import tempfile


def file_sha256(path, chunk_bytes=1 << 20):
    """Hex sha256 of a file's bytes, read in chunks (checkpoints reach a few GB)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b''):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success fsync it and os.replace it into place.

    Readers never see a half-written file, and a crash leaves the previous file intact.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary readable file
    try:
        yield tmp
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not supported everywhere)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
