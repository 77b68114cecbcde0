"""`atrl bench vision`, kept at this path for gpu.sh and the docs: see `atrl.bench.vision_attention`."""

from atrl.bench.vision_attention import main

if __name__ == "__main__":
    main()
