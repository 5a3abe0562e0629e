"""A CUDA producer's per-layer signals (the IpcConnector's layer-by-layer transfer): one interprocess event per layer,
recorded on the compute stream as soon as that layer's K/V of a step are written: right after the write in an eager
forward, after the piece that writes them in a piecewise graph (the attention runs between pieces), and at the end
of a step that ran as one CUDA graph (decodes), for every layer it did not signal.

A consumer told, after a step was launched, which of the producer's blocks that step fills waits on layer i's event
before it copies layer i, so its copy of the first layers runs while the producer computes the later ones. The
consumer's wait binds to the event's latest record: a later step that recorded it again only makes the wait longer
(the same stream), never too short."""

from __future__ import annotations

import torch


class LayerEvents:
    def __init__(self, kv_caches: list[torch.Tensor]) -> None:
        self.device = kv_caches[0].device
        self.layer_of = {kv.data_ptr(): i for i, kv in enumerate(kv_caches)}
        with torch.cuda.device(self.device):
            self.events = [torch.cuda.Event(interprocess=True) for _ in kv_caches]
            for event in self.events:  # recorded once, so that a wait before the first step has something to bind to
                event.record(torch.cuda.current_stream(self.device))
        self.signalled = [False] * len(kv_caches)  # in the step being launched

    def handles(self) -> list[bytes]:
        return [event.ipc_handle() for event in self.events]

    def written(self, kv_cache: torch.Tensor) -> None:
        """The K/V of the layer that owns `kv_cache` are written (in stream order) up to here."""
        layer = self.layer_of.get(kv_cache.data_ptr())
        if layer is not None:
            self.events[layer].record()
            self.signalled[layer] = True

    def step_done(self) -> None:
        """After a step's forward was launched: the layers it did not signal (a whole-step graph) are signalled now."""
        for layer, signalled in enumerate(self.signalled):
            if not signalled:
                self.events[layer].record()
        self.signalled = [False] * len(self.signalled)
