"""Energy of a replay: NVML's energy counter on an NVIDIA GPU, else an estimate from CPU time.

CPU estimate (stated in every report): ``joules = process CPU seconds x watts per busy core``. The
process CPU time counts only this process's work (other processes on a shared machine do not
inflate it); the per-core power is a scenario setting (``evaluation.cpu_watts_per_core``, default
15 W: a server core's share of a ~100-200 W package, within the range RAPL reports for busy cores).
It ignores idle and uncore power, so use it to compare controllers, not as an absolute figure.
"""

from __future__ import annotations

import time

from helios_rl.utils.nvml import NvmlEnergy, open_energy_counter


class EnergyMeter:
    """Started at construction; :meth:`read` returns joules so far and the method used."""

    def __init__(self, cpu_watts_per_core: float = 15.0) -> None:
        self.watts = float(cpu_watts_per_core)
        self.cpu0 = time.process_time()
        self.nvml = open_energy_counter()  # None without CUDA, pynvml or a GPU energy counter
        self.mj0 = self.nvml.millijoules() if self.nvml is not None else None

    def read(self) -> dict:
        cpu_s = time.process_time() - self.cpu0
        out = {"cpu_s": cpu_s, "joules": cpu_s * self.watts,
               "method": f"estimate: process CPU time x {self.watts:g} W per busy core"}
        if self.nvml is not None:
            joules = NvmlEnergy.joules_between(self.mj0, self.nvml.millijoules())
            if joules is not None:
                out.update(joules=joules, method="measured: NVML total energy counter (GPU)")
        return out
