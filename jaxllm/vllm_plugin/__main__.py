"""`python -m jaxllm.vllm_plugin --explain`: what jaxllm changes in tpu-inference on this host.

Registers the plugin as vLLM would, imports the modules it patches (as an engine
process does) and lists every replaced name with why. `JAX_PLATFORMS=tpu` shows
what a TPU host gets, `JAX_PLATFORMS=cpu` what the CPU host adaptations add.
"""

from __future__ import annotations

import argparse
import importlib


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.vllm_plugin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--explain", action="store_true", help="list every name jaxllm replaces, and why")
    args = parser.parse_args()
    if not args.explain:
        parser.print_help()
        return
    from jaxllm import platform
    from jaxllm.vllm_plugin import patching, register

    register()
    for module in sorted({patch.module for patch in patching.installed()}):
        importlib.import_module(module)
    print(f"host: {'TPU' if platform.on_tpu() else 'not a TPU (host adaptations installed)'}")
    print(patching.explain())


if __name__ == "__main__":
    main()
