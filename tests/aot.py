"""Ahead-of-time compilation of a Triton kernel for a GPU this machine does not have, and its resource usage.
Imported by the compile scripts of the kernel tests, which run in a subprocess without TRITON_INTERPRET."""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block: A100, H100


def compile_for(kernel, signature, constants, arch, num_warps=4, num_stages=3):
    """Compiles for sm_<arch> and returns (shared memory bytes, cuobjdump --dump-resource-usage text)."""
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return compiled.metadata.shared, usage


def spill_bytes(usage):
    """Stack (spilled registers) plus local memory, in bytes, over the functions in the report."""
    stack = max(int(x) for x in re.findall(r"STACK:(\d+)", usage))
    return stack + max(int(x) for x in re.findall(r"LOCAL:(\d+)", usage))


def run_compile_script(script, root, timeout=900):
    """Runs a compile script in a fresh interpreter without TRITON_INTERPRET (real compilation) and returns the
    list of rows it prints as JSON on its last line."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, env=env,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_fits(row, what):
    """No spilled registers, no local memory, shared memory within the card's limit."""
    assert row["shared"] <= SHARED_LIMIT[row["arch"]], f"{what}: {row['shared']} bytes of shared memory"
    assert spill_bytes(row["usage"]) == 0, f"{what}: {row['usage']}"
