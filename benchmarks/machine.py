"""What the benchmarks record about the machine they ran on."""
import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ('AMD EPYC', 'Intel(R) Xeon(R) ...'), else what platform knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown'
