"""The model registry: the on-device store plus the load / unload / ready lifecycle.

Loading happens off the event loop and always completes (warm-up and self-test included)
before anything is swapped, so a replacement is ready before the version it replaces is let
go (MLServer's order). A version that leaves every active set is unloaded when the last
batch that holds it finishes: nothing else references its session, so it is freed then, and
a batch already in flight never finds its model gone."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from edgeml.config import ModelSlotConfig, PipelineConfig
from edgeml.core.model import LoadedModel
from edgeml.errors import EdgemlError, ModelError, StoreError
from edgeml.storage.models import InstalledModel, ModelStore

log = logging.getLogger("edgeml.control.registry")


def check_compatible(pcfg: PipelineConfig, manifest: Any) -> None:
    """Refuse a model whose input does not fit the pipeline (count, names, window)."""
    spec = manifest.input
    who = f"{manifest.name} {manifest.version}"
    if pcfg.features is not None and len(pcfg.features) != len(spec.features):
        raise ModelError(f"{who} takes {len(spec.features)} features per sample; pipeline "
                         f"{pcfg.name} gives {len(pcfg.features)}")
    if pcfg.features is not None and tuple(pcfg.features) != tuple(spec.features):
        log.warning("%s: feature names %s differ from the pipeline's %s (taken by position)",
                    who, list(spec.features), list(pcfg.features))
    want = pcfg.window.size if pcfg.window else None
    if (spec.window or None) != want:
        raise ModelError(f"{who} expects windows of {spec.window or 1} sample(s); pipeline "
                         f"{pcfg.name} makes {want or 1}")


class ModelRegistry:
    """``data_dir/models`` with the device's trust settings and firmware profile."""

    def __init__(self, store: ModelStore, *, profile: Any, trusted_keys: list,
                 max_bundle_bytes: int) -> None:
        self.store = store
        self.profile = profile
        self.trusted_keys = trusted_keys
        self.max_bundle_bytes = max_bundle_bytes

    # ---- the store ---------------------------------------------------------------------
    def get(self, name: str, version: str) -> InstalledModel:
        return self.store.get(name, version)

    def installed(self, name: str, version: str) -> InstalledModel | None:
        try:
            return self.store.get(name, version)
        except StoreError:
            return None

    def read_bundle(self, data: bytes) -> Any:
        from edgeml.bundle import read_bundle

        return read_bundle(data, trusted_keys=self.trusted_keys,
                           max_bytes=self.max_bundle_bytes)

    def install(self, bundle: Any) -> InstalledModel:
        """A verified bundle, or a bundle file (verified here against the trusted keys)."""
        if isinstance(bundle, (str, Path)):
            return self.store.install(bundle, trusted_keys=self.trusted_keys)
        return self.store.install(bundle)

    def remove(self, name: str, version: str) -> None:
        self.store.remove(name, version)

    def prune(self, name: str, keep: int, protect: set[str]) -> list[str]:
        return self.store.prune(name, keep, protect)

    # ---- the lifecycle -------------------------------------------------------------------
    async def load(self, pcfg: PipelineConfig, installed: InstalledModel) -> LoadedModel:
        """Check it fits the pipeline, build the session, warm up, self-test."""
        check_compatible(pcfg, installed.manifest)
        model = LoadedModel.from_installed(installed, profile=self.profile)
        await asyncio.to_thread(model.load)
        return model

    async def load_configured(self, pcfg: PipelineConfig, m: ModelSlotConfig) -> LoadedModel:
        """A model named in the config: installed from its bundle file first when one is
        given, else taken from the store."""
        if m.bundle is not None:
            installed = await asyncio.to_thread(self.install, m.bundle)
            if (installed.name, installed.version) != (m.name, m.version):
                raise EdgemlError(f"bundle {m.bundle} holds {installed.name} "
                                  f"{installed.version}, not {m.name} {m.version}")
        else:
            installed = self.get(m.name, m.version)
        return await self.load(pcfg, installed)

