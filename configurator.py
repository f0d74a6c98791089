"""
The poor man's configurator, with checks. Used by train.py, sample.py and bench.py:

    python train.py config/quickstart.py --batch_size=32 --attn=hyperglu

Each argument without '=' is a Python config file whose top-level assignments override the script's
globals; each --key=value overrides one global. Later arguments win. A config file sees the settings as
they stand when it runs, so it can be an overlay on an earlier one (config/hyperglu.py reads n_embd and
n_layer to match the budget). Names in a config file that start with '_', and imported modules, classes
and functions, are left alone, so a config file may compute its values (e.g. with config.budget.match_budget).

Checks: an unknown key is an error listing the closest valid keys; a value of the wrong type is an error
naming the key and the expected type. An int is accepted for a float (--dropout=0), and None for a
setting whose default is None (None means "auto").

--help (or -h) prints the script's docstring and its settings with their defaults and comments, read from
the settings block of its source (the lines between the first two "# ---" lines), and exits.
"""

import ast
import dataclasses
import difflib
import inspect
import re
import types


def _check(key, value, defaults, expected, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.5)
        hint = f"; closest valid keys: {', '.join(close)}" if close else ""
        raise ValueError(f"{source}: unknown config key '{key}'{hint}")
    want = expected[key]
    if want is None or (value is None and defaults[key] is None):
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise ValueError(f"{source}: config key '{key}' expects {want.__name__}, got {value!r} ({type(value).__name__})")
    return value


def usage(g, keys):
    """The --help text: the script's docstring, its settings block as written, then any other settings (train.py's
    GPTConfig fields) with the comment beside the field in its dataclass."""
    with open(g["__file__"]) as f:
        src = f.read().splitlines()
    marks = [i for i, line in enumerate(src) if line.startswith("# ---")] + [0, 0]
    out = [(g.get("__doc__") or "").strip(), "", "settings and their defaults (a config file or --key=value overrides them):"]
    shown = set()
    for line in src[marks[0] + 1:marks[1]]:
        m = re.match(r"(\w+)\s*=", line)
        if m and m.group(1) in keys or line.startswith("#"):
            out.append(line)
            shown.add(m and m.group(1))
    notes = {}  # field -> the comment beside it in a dataclass the script uses (the subclass's wins)
    for cls in [c for v in list(g.values()) if isinstance(v, type) and dataclasses.is_dataclass(v) for c in v.__mro__]:
        try:
            for line in inspect.getsource(cls).splitlines():
                if m := re.match(r"\s+(\w+):[^=#]*=[^#]*#\s*(.*)", line):
                    notes.setdefault(m.group(1), m.group(2))
        except (OSError, TypeError):  # a class without source (a builtin)
            pass
    rest = [k for k in keys if k not in shown]
    if rest:
        out.append("# the other settings")
        out += [f"{k} = {g[k]!r}" + (f"  # {notes[k]}" if k in notes else "") for k in rest]
    return "\n".join(out)


def configure(g, keys, argv, annotations=None):
    """Apply config files and --key=value overrides in argv to the dict g (a script's globals()).

    keys: the names that are settings. annotations: {key: type} for settings whose default is None
    (their type cannot be read from the value). Returns the list of (key, value) applied, in order."""
    if "--help" in argv or "-h" in argv:
        print(usage(g, keys))
        raise SystemExit(0)
    annotations = annotations or {}
    current = {k: g[k] for k in keys}
    expected = {k: (type(v) if v is not None else annotations.get(k)) for k, v in current.items()}
    applied = []
    for arg in argv:
        if "=" not in arg:
            if arg.startswith("--"):
                raise ValueError(f"argument '{arg}': expected --key=value or a config file path")
            scope = {k: g[k] for k in keys}
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise ValueError(f"config file '{arg}' cannot be read: {e.strerror}") from None
            exec(compile(code, arg, "exec"), scope)
            for k, v in scope.items():
                if k.startswith("_") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                    continue
                if k in keys and v is g[k]:
                    continue  # seen, not changed
                g[k] = _check(k, v, current, expected, f"config file '{arg}'")
                applied.append((k, g[k]))
        else:
            if not arg.startswith("--"):
                raise ValueError(f"argument '{arg}': expected --key=value")
            k, raw = arg[2:].split("=", 1)
            try:
                v = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                v = raw  # a bare string such as --attn=hyperglu
            if expected.get(k) is str and not isinstance(v, str):
                v = raw  # --dataset=123 is the string "123"
            g[k] = _check(k, v, current, expected, f"--{k}")
            applied.append((k, g[k]))
    return applied


def pick_device(device):
    """(device, device type) for a --device setting: None picks cuda, then mps, then cpu. A name torch does not
    know, or a device this machine lacks, is a ValueError naming the setting and what was expected."""
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not valid; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here (torch {torch.__version__}); "
                         f"expected --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available here; expected --device=cpu")
    return device, device_type
