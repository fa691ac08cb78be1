"""
train.py's settings from config files and --key=value overrides, as in nanoGPT: a config file is plain Python
whose globals replace the settings of the same name, then each --key=value does; every setting keeps its type.
`check` then holds values to their choices and ranges: a bad one stops in one line, before anything loads.

    python train.py config/shapes.py --batch_size=32 --out_dir=out-b32
"""
import ast
import os
import sys
import tempfile


def configure(settings, argv):
    """Apply config files (exec'd) and --key=value overrides to the settings dict; unknown keys and values of
    another type are errors. Returns the keys that were set."""
    given = set()

    def apply(key, value, where):
        given.add(key)
        if key not in settings:
            sys.exit(f'config error: unknown setting {key!r} ({where})')
        old = settings[key]
        if type(value) is int and type(old) is float:
            value = float(value)
        if type(value) is not type(old):
            sys.exit(f'config error: {key} must be {type(old).__name__}, got {value!r} ({where})')
        settings[key] = value

    for arg in argv:
        if arg.startswith('--'):
            key, sep, text = arg[2:].partition('=')
            if not sep:
                sys.exit(f'config error: write --{key}=VALUE')
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string, e.g. --out_dir=out-shapes
            apply(key, value, 'command line')
        else:
            if not os.path.isfile(arg):
                sys.exit(f'config error: no config file {arg}')
            scope = {}
            exec(open(arg).read(), scope)
            for key, value in scope.items():
                if not key.startswith('_'):
                    apply(key, value, arg)
    return given


def check(settings, choices, at_least, positive, fractions, folders=()):
    """Stop at the first setting out of bounds: a string not among its choices, a number under its least value, one
    not above 0 (positive) or outside [0, 1] (fractions), a folder the run will write to that it cannot (folders:
    created here, as the run would, so that a bad one stops now, not at the first checkpoint minutes later)."""
    for key, allowed in choices.items():
        if settings[key] not in allowed:
            sys.exit(f"config error: {key} must be {' or '.join(map(repr, allowed))}, got {settings[key]!r}")
    for key, ok, bound in ([(k, settings[k] >= low, f'>= {low}') for k, low in at_least.items()] +
                           [(k, settings[k] > 0, '> 0') for k in positive] +
                           [(k, 0 <= settings[k] <= 1, 'in [0, 1]') for k in fractions]):
        if not ok:
            sys.exit(f'config error: {key} must be {bound}, got {settings[key]}')
    for key in folders:
        try:
            os.makedirs(settings[key], exist_ok=True)
            tempfile.TemporaryFile(dir=settings[key]).close()
        except OSError as e:
            sys.exit(f'config error: {key} {settings[key]!r} is not a folder this run can write ({e.strerror})')
