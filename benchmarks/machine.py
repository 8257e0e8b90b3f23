"""What the benchmarks say about the machine they ran on."""

import platform


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo (every figure names its machine)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
