"""GPU energy from NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``).

Available on NVIDIA GPUs from Volta on, with ``nvidia-ml-py`` installed (the ``gpu`` extra). The
counter is in millijoules since the driver loaded; the driver refreshes it every few tens of
milliseconds, so one short step's reading is coarse but sums over many steps are exact. Everywhere
else (CPU, no ``pynvml``, a GPU without the counter) :func:`open_energy_counter` returns ``None``;
nothing here raises.
"""

from __future__ import annotations

import torch


class NvmlEnergy:
    """The energy counter of one GPU."""

    def __init__(self, pynvml, handle) -> None:
        self._nvml, self._handle = pynvml, handle

    def millijoules(self) -> int | None:
        """Counter value now (mJ), or None if the read fails."""
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:  # driver hiccup: a missing reading, never an error in the serving loop
            return None

    @staticmethod
    def joules_between(mj0: int | None, mj1: int | None) -> float | None:
        if mj0 is None or mj1 is None:
            return None
        return (mj1 - mj0) / 1000.0


def open_energy_counter(device: torch.device | str | None = None) -> NvmlEnergy | None:
    """The NVML energy counter of CUDA ``device`` (current device when None), else None."""
    try:
        if not torch.cuda.is_available():
            return None
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.type != "cuda":
            return None
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:  # CUDA_VISIBLE_DEVICES may renumber devices: match NVML's by UUID
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        counter = NvmlEnergy(pynvml, handle)
        return counter if counter.millijoules() is not None else None
    except Exception:  # no pynvml, no driver, no counter on this GPU
        return None
