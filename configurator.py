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
setting whose default is None ("auto") or whose comment documents None (sample.py's top_k). A config file
that does not compile, or fails, is an error with its file:line and that line. A model setting (model_keys)
that an overlay read, or set after reading one, may not change after it: config/hyperglu.py matched the
budget to it, and the comparison would silently be unmatched; the change belongs before the overlay.

--help (or -h) prints the script's docstring and its settings with their defaults and comments, read from
the settings block of its source (the lines between the first two "# ---" lines), and exits.
"""

import ast
import dataclasses
import difflib
import inspect
import re
import traceback
import types


def _check(key, value, defaults, expected, source, nullable=()):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.5)
        hint = f"; closest valid keys: {', '.join(close)}" if close else ""
        raise ValueError(f"{source}: unknown config key '{key}'{hint}")
    want = expected[key]
    if want is None or (value is None and (defaults[key] is None or key in nullable)):
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise ValueError(f"{source}: config key '{key}' expects {want.__name__}, got {value!r} ({type(value).__name__})")
    return value


def settings_block(g):
    """The lines of the script's settings block (between its first two "# ---" lines); [] without a script file."""
    try:
        with open(g["__file__"]) as f:
            src = f.read().splitlines()
    except (KeyError, OSError):
        return []
    marks = [i for i, line in enumerate(src) if line.startswith("# ---")] + [0, 0]
    return src[marks[0] + 1:marks[1]]


def field_notes(g):
    """{field: the comment beside it} in the dataclasses the script uses (train.py's GPTConfig; a subclass's wins)."""
    notes = {}
    for cls in [c for v in list(g.values()) if isinstance(v, type) and dataclasses.is_dataclass(v) for c in v.__mro__]:
        try:
            for line in inspect.getsource(cls).splitlines():
                if m := re.match(r"\s+(\w+):[^=#]*=[^#]*#\s*(.*)", line):
                    notes.setdefault(m.group(1), m.group(2))
        except (OSError, TypeError):  # a class without source (a builtin)
            pass
    return notes


def documents_none(g, keys):
    """The settings whose comment gives None a meaning ("# None = no top-k filtering"): None is valid for them."""
    notes = field_notes(g)
    for line in settings_block(g):
        if m := re.match(r"(\w+)\s*=[^#]*#\s*(.*)", line):
            notes[m.group(1)] = m.group(2)
    return {k for k in keys if re.search(r"\bNone\s*(=|->|:)", notes.get(k, ""))}


def usage(g, keys):
    """The --help text: the script's docstring, its settings block as written, then any other settings (train.py's
    GPTConfig fields) with the comment beside the field in its dataclass."""
    out = [(g.get("__doc__") or "").strip(), "", "settings and their defaults (a config file or --key=value overrides them):"]
    shown = set()
    for line in settings_block(g):
        m = re.match(r"(\w+)\s*=", line)
        if m and m.group(1) in keys or line.startswith("#"):
            out.append(line)
            shown.add(m and m.group(1))
    notes = field_notes(g)
    rest = [k for k in keys if k not in shown]
    if rest:
        out.append("# the other settings")
        out += [f"{k} = {g[k]!r}" + (f"  # {notes[k]}" if k in notes else "") for k in rest]
    return "\n".join(out)


class _Reads(dict):
    """A config file's namespace that notes which of the settings set before the file it reads (at its top level,
    where a config file computes): an overlay that read the model's size depends on it."""

    def __init__(self, settings):
        super().__init__(settings)
        self.before, self.read = set(settings), set()

    def __getitem__(self, k):
        if k in self.before:
            self.read.add(k)
        return super().__getitem__(k)

    def __setitem__(self, k, v):
        self.before.discard(k)  # what the file reads after setting it is its own value
        super().__setitem__(k, v)


def run_config(path, code, scope):
    """exec a config file in scope. A file that does not compile, or raises, is a ValueError with its file:line and
    that line."""
    try:
        exec(compile(code, path, "exec"), scope)
    except SyntaxError as e:
        raise ValueError(f"config file {path}:{e.lineno}: {e.msg}: {(e.text or '').strip()}") from None
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        where = f"{path}:{frames[-1].lineno}" if frames else path
        line = f" (in: {frames[-1].line})" if frames and frames[-1].line else ""
        what = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"config file {where}: {what}{line}") from None


def configure(g, keys, argv, annotations=None, model_keys=()):
    """Apply config files and --key=value overrides in argv to the dict g (a script's globals()).

    keys: the names that are settings. annotations: {key: type} for settings whose default is None
    (their type cannot be read from the value). model_keys: the settings that size the model (train.py: GPTConfig's
    fields), which an overlay may read to match a budget. Returns the list of (key, value) applied, in order."""
    if "--help" in argv or "-h" in argv:
        print(usage(g, keys))
        raise SystemExit(0)
    annotations = annotations or {}
    current = {k: g[k] for k in keys}
    expected = {k: (type(v) if v is not None else annotations.get(k)) for k, v in current.items()}
    nullable = documents_none(g, keys)
    matched = {}  # model setting -> (the overlay that read the model settings and this one or set it, what it read)
    applied = []

    def set_(k, v, arg, source):
        v = _check(k, v, current, expected, source, nullable)
        if k in matched and v != g[k]:
            overlay, read = matched[k]
            raise ValueError(f"{arg} changes {k} after {overlay}, which read the model's settings ({', '.join(read)}) "
                             f"to match the parameter budget: the match would no longer hold. Put {arg} before "
                             f"{overlay}, so that the match sees it, or re-run the match after all overrides (an "
                             f"overlay of your own, last, that calls model.match_budget)")
        g[k] = v
        applied.append((k, v))

    for arg in argv:
        if "=" not in arg:
            if arg.startswith("--"):
                raise ValueError(f"argument '{arg}': expected --key=value or a config file path")
            scope = _Reads({k: g[k] for k in keys})
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise ValueError(f"config file '{arg}' cannot be read: {e.strerror}") from None
            run_config(arg, code, scope)
            changed = []
            for k, v in dict(scope).items():
                if k.startswith("_") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                    continue
                if k in keys and v is g[k]:
                    continue  # seen, not changed
                set_(k, v, arg, f"config file '{arg}'")
                changed.append(k)
            read = sorted(scope.read & set(model_keys), key=list(keys).index)
            if read:
                for k in read + [k for k in changed if k in model_keys]:
                    matched.setdefault(k, (arg, read))
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
            set_(k, v, arg, f"--{k}")
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
