"""``edgeml keygen -o PREFIX``: make an Ed25519 key pair for signing bundles."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "create an Ed25519 key pair for signing bundles (PREFIX.key, PREFIX.pub)"
DESCRIPTION = """\
Create an Ed25519 key pair for signing model bundles.

  PREFIX.key  private key (PEM PKCS8, mode 0600): keep it on the build host, sign with
              `edgeml convert ... --sign-key PREFIX.key`
  PREFIX.pub  public key (PEM): copy it to every device and list it in the config's
              trusted_keys; from then on the device refuses unsigned or foreign bundles

Existing files are never replaced unless --force is given.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", required=True, metavar="PREFIX", type=Path,
        help="write PREFIX.key and PREFIX.pub (e.g. keys/release)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace existing PREFIX.key / PREFIX.pub (the old private key is lost)",
    )


def run(args: argparse.Namespace) -> int:
    from edgeml.keys import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(args.output, overwrite=args.force)
    kid = key_id(load_public_key(public))
    print(f"private key: {private} (keep secret)")
    print(f"public key:  {public} (key id {kid}; add it to trusted_keys on devices)")
    return 0
