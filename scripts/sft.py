"""SFT entry point: `accelerate launch scripts/sft.py --config configs/sft_smollm2.yaml [--key value ...]`."""

from brep_rl.sft import main

if __name__ == "__main__":
    main()
