"""The package layout is the architecture: the device side never imports host tools or the
training stack, and no module imports another that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edgeml

PACKAGE = Path(edgeml.__file__).resolve().parent
HOST_ONLY = ("edgeml.host", "converters", "sklearn", "skl2onnx", "matplotlib", "onnx",
             "joblib", "amqtt", "psycopg", "nats")
HOST_COMMANDS = "edgeml.host.commands"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = ("edgeml", *p.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (also inside functions:
    a lazy import is still an import)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _is(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def test_device_modules_never_import_host_code() -> None:
    bad = []
    for name, path in _modules().items():
        if _is(name, "edgeml.host"):
            continue
        for imp in _imports(name, path):
            if any(_is(imp, h) for h in HOST_ONLY):
                bad.append(f"{name} imports {imp}")
    assert not bad, "device code imports host-only code:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imp in _imports(name, path):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):
                targets.add(imp)
        edges[name] = targets
    # any strongly connected component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_edgeml_run_imports_no_host_code(tmp_path: Path) -> None:
    """What ``edgeml run`` loads, in a fresh interpreter: the CLI with the run verb, the device
    composition root and every device module it may import lazily."""
    device_modules = sorted(n for n in _modules() if not _is(n, "edgeml.host")
                            and not n.endswith("__main__"))
    code = (
        "import sys, importlib\n"
        "from edgeml.cli import build_parser\n"
        "build_parser('run')\n"
        f"for m in {device_modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') "
        f"for h in {HOST_ONLY!r}))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_run_verb_does_not_load_other_verbs(tmp_path: Path) -> None:
    code = ("import sys\nfrom edgeml.cli import build_parser\nbuild_parser('run')\n"
            "print(sorted(m for m in sys.modules if m.startswith('edgeml.host')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_wheel_carries_every_package_and_data_file(tmp_path: Path) -> None:
    """``pip install .`` (the quick start) installs what the repository has: every package
    under edgeml/ and converters/, the firmware profiles and the demo data."""
    import zipfile

    root = PACKAGE.parent
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path)]
    proc = subprocess.run([*cmd, "--no-build-isolation", str(root)], capture_output=True,
                          text=True)
    if proc.returncode != 0:  # no setuptools/wheel in this environment: let pip fetch them
        proc = subprocess.run([*cmd, str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("edgeml-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(root)) for d in ("edgeml", "converters", "firmware_profiles")
            for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and p.suffix in (".py", ".toml", ".ts", ".csv")}
    assert want <= names, sorted(want - names)
