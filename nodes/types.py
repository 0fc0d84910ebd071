"""Custom V3 socket types of the pack."""

from __future__ import annotations

from comfy_api.latest import io

CoDiInfoType = io.Custom("CODI_INFO")
"""An adapter's sampler facts (:class:`nodes.codi_info.CoDiInfo`), output by CoDi Adapter Loader."""
