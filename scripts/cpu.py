"""The CPU a figure was measured on, as the docs name it (benchmark, seed spreads, fresh-clone timings).

Two VMs that both report "AMD EPYC" ran the same handler 1.6x apart, and int8 kernels depend on the vector extensions
a CPU has, so the name carries the x86 family and model and those extensions along with the model name.
"""

import platform
import re
from pathlib import Path

VECTOR_EXTENSIONS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
                     "amx_tile": "AMX"}
"""/proc/cpuinfo flags that decide the speed of float and int8 kernels, and how the docs name them."""


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """E.g. "AMD EPYC (family 23 model 49; AVX2)": the model name, family and model, and the vector extensions
    present; ``platform.processor()`` where there is no /proc/cpuinfo."""
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    found = re.findall(r"^(model name|cpu family|model|flags)\s*:\s*(.*)$", text, re.M)
    fields = dict(reversed(found))  # the first CPU's, where every CPU repeats them
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" not in fields:
        return name
    flags = set(fields.get("flags", "").split())
    extensions = [label for flag, label in VECTOR_EXTENSIONS.items() if flag in flags] or ["no AVX2"]
    return f"{name} (family {fields['cpu family']} model {fields.get('model', '?')}; {', '.join(extensions)})"
