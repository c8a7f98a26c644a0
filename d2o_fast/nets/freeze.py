"""D2O-F freeze levels: which generator parameters stay at their pretrained values.

The authors' rule, by parameter name: frozen when the name contains one of
block/up/down/in (a U-Net block) AND one of the level's keys.
    level 1: conv, proj          (conv0/conv1 of every block, attention output proj)
    level 2: conv, proj, qkv
    level 3: conv, proj, qkv, skip
Frozen parameters get requires_grad=False, so no weight gradient is ever computed for
them, and they are left out of the optimizer.
"""

import collections

FREEZE_KEYS = {0: (), 1: ('conv', 'proj'), 2: ('conv', 'proj', 'qkv'), 3: ('conv', 'proj', 'qkv', 'skip')}
BLOCK_KEYS = ('block', 'up', 'down', 'in')


def is_frozen(name, freeze_level):
    if freeze_level not in FREEZE_KEYS:
        raise ValueError(f'freeze_level must be 0-3, got {freeze_level!r}')
    keys = FREEZE_KEYS[freeze_level]
    return any(k in name for k in BLOCK_KEYS) and any(k in name for k in keys)


def apply_freeze(net, freeze_level):
    """Set requires_grad by the rule; returns the list of trainable parameters."""
    trainable = []
    for name, p in net.named_parameters():
        frozen = is_frozen(name, freeze_level)
        p.requires_grad_(not frozen)
        if not frozen:
            trainable.append(p)
    return trainable


def _module_kind(name):
    """'conv0', 'affine', 'norm1', 'map_layer0', 'aux_residual', ... of a parameter name."""
    parts = name.split('.')
    owner = parts[-2] if len(parts) >= 2 else parts[0]
    if '_' in owner and 'x' in owner.split('_')[0]:   # '32x32_conv' -> 'conv'
        owner = owner.split('_', 1)[1]
    return owner


def freeze_report(net, freeze_level=None):
    """Parameter counts (total, trainable, frozen) per module kind, plus a 'total' row.

    With freeze_level None the current requires_grad flags are reported; otherwise the
    rule is evaluated without touching the net.
    """
    rows = collections.OrderedDict()
    for name, p in net.named_parameters():
        frozen = (not p.requires_grad) if freeze_level is None else is_frozen(name, freeze_level)
        row = rows.setdefault(_module_kind(name), [0, 0, 0])
        n = p.numel()
        row[0] += n
        row[1 if not frozen else 2] += n
    total = [sum(r[i] for r in rows.values()) for i in range(3)]
    rows['total'] = total
    return {k: dict(total=v[0], trainable=v[1], frozen=v[2]) for k, v in rows.items()}


def format_freeze_report(report):
    lines = [f'{"module kind":<16}{"total":>14}{"trainable":>14}{"frozen":>14}{"frozen %":>10}']
    for kind, r in report.items():
        pct = 100.0 * r['frozen'] / max(r['total'], 1)
        lines.append(f'{kind:<16}{r["total"]:>14,}{r["trainable"]:>14,}{r["frozen"]:>14,}{pct:>9.1f}%')
    return '\n'.join(lines)
