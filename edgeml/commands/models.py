"""``edgeml models install | ls | rm | prune``: manage the device's model store by hand."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HELP = "install, list and remove model versions in the device's model store"
DESCRIPTION = """\
Manage the model store under DATA_DIR/models/<name>/<version>/.

  edgeml models install BUNDLE [--trusted-key PUB ...] --data-dir DIR
  edgeml models ls [--json] --data-dir DIR
  edgeml models rm NAME VERSION --data-dir DIR
  edgeml models prune NAME --keep N [--protect VERSION ...] --data-dir DIR

install verifies the bundle (zip structure, sha256, the signature when trusted keys are given)
and runs its self-test through onnxruntime before anything is written; a bad bundle is refused
with the reason and exit code 1. --data-dir defaults to $EDGEML_DATA_DIR, else /var/lib/edgeml.
"""

DEFAULT_DATA_DIR = "/var/lib/edgeml"


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("EDGEML_DATA_DIR", DEFAULT_DATA_DIR)),
        metavar="DIR",
        help="the device's data directory; models live in DIR/models "
        "(default: $EDGEML_DATA_DIR or %(default)s)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_cmd", metavar="COMMAND", required=True)

    p = sub.add_parser("install", help="verify a bundle and install it")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the .edgeml bundle file")
    p.add_argument(
        "--trusted-key", action="append", default=[], type=Path, metavar="PUB",
        help="an Ed25519 public key file (repeatable); when given, the bundle must be "
        "signed by one of them",
    )
    p.add_argument(
        "--no-self-test", action="store_true",
        help="skip running the manifest's self-test through onnxruntime before installing",
    )
    p.add_argument(
        "--profile", default="x86-gateway", metavar="NAME_OR_PATH",
        help="firmware profile for the self-test session (default: %(default)s)",
    )
    _data_dir_arg(p)

    p = sub.add_parser("ls", help="list installed model versions")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    _data_dir_arg(p)

    p = sub.add_parser("rm", help="remove one installed model version")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", help="model version")
    _data_dir_arg(p)

    p = sub.add_parser("prune", help="remove all but the newest N versions of a model")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("--keep", type=int, required=True, metavar="N",
                   help="how many of the newest versions to keep")
    p.add_argument("--protect", action="append", default=[], metavar="VERSION",
                   help="never remove this version (repeatable), e.g. the one in use")
    _data_dir_arg(p)


def _self_test(bundle, profile) -> str:
    """Run the self-test rows through onnxruntime; raise SelfTestError/ModelError on failure."""
    from edgeml.bundle import check_self_test, self_test_array
    from edgeml.errors import ModelError
    from edgeml.profiles import create_session

    m = bundle.manifest
    if m.self_test is None:
        return "no self-test in the manifest"
    session = create_session(bundle.model_bytes, profile)
    names = [n for n in (m.outputs.label, m.outputs.scores) if n]
    try:
        outs = session.run(names, {m.input.name: self_test_array(m)})
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelError(f"{m.name} {m.version}: self-test run failed: {exc}") from exc
    labels = outs[0] if m.outputs.label else None
    scores = outs[-1] if m.outputs.scores else None
    check_self_test(m, labels, scores)
    return f"self-test passed ({len(m.self_test.inputs)} rows)"


def _install(args: argparse.Namespace) -> int:
    from edgeml.bundle import read_bundle
    from edgeml.errors import BundleError, EdgemlError
    from edgeml.keys import load_trusted_keys
    from edgeml.profiles import load_profile
    from edgeml.storage.models import ModelStore

    keys = load_trusted_keys(args.trusted_key)
    profile = None if args.no_self_test else load_profile(args.profile)
    try:
        bundle = read_bundle(args.bundle, trusted_keys=keys)
        note = "self-test skipped" if profile is None else _self_test(bundle, profile)
    except BundleError as exc:
        raise type(exc)(f"refused {args.bundle}: {exc}") from exc
    except EdgemlError as exc:
        raise BundleError(f"refused {args.bundle}: {exc}") from exc
    store = ModelStore(args.data_dir / "models")
    existed = True
    try:
        store.get(bundle.manifest.name, bundle.manifest.version)
    except EdgemlError:
        existed = False
    installed = store.install(bundle)
    m = installed.manifest
    signer = f"signed by {bundle.signer}" if bundle.signer else (
        "signed, signature not checked (no --trusted-key)" if installed.signed else "unsigned")
    verb = "already installed" if existed else "installed"
    print(f"{verb} {m.name} {m.version} -> {installed.path}")
    print(f"  sha256 {m.sha256}, {m.size} bytes, {signer}; {note}")
    return 0


def _row(model) -> dict:
    m = model.manifest
    return {
        "name": m.name, "version": m.version, "kind": m.outputs.kind,
        "created": m.created, "sha256": m.sha256, "size": m.size, "signed": model.signed,
        "features": list(m.input.features), "window": m.input.window,
        "description": m.description, "path": str(model.path),
    }


def _ls(args: argparse.Namespace) -> int:
    from edgeml.storage.models import ModelStore

    rows = [_row(m) for m in ModelStore(args.data_dir / "models").list()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models installed in {args.data_dir / 'models'}")
        return 0
    header = ("NAME", "VERSION", "KIND", "SIZE", "SIGNED", "CREATED", "SHA256")
    table = [header] + [
        (r["name"], r["version"], r["kind"], str(r["size"]), "yes" if r["signed"] else "no",
         r["created"], r["sha256"][:12])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _rm(args: argparse.Namespace) -> int:
    from edgeml.storage.models import ModelStore

    ModelStore(args.data_dir / "models").remove(args.name, args.version)
    print(f"removed {args.name} {args.version}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from edgeml.storage.models import ModelStore

    removed = ModelStore(args.data_dir / "models").prune(args.name, args.keep, args.protect)
    print(f"removed {args.name} {', '.join(removed)}" if removed else "nothing to remove")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"install": _install, "ls": _ls, "rm": _rm, "prune": _prune}[args.models_cmd](args)
