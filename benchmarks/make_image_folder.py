"""Write the job's synthetic 2D shapes as an image folder in ImageFolder's layout, one subfolder per class,
half PNG and half JPEG, 8-bit, for the job's image-folder reference run (benchmarks/README.md):

    python benchmarks/make_image_folder.py /tmp/shapes && python -m swav_core.pretrain --data /tmp/shapes --out runs/images
"""
import os
import sys

import torch
from PIL import Image

from swav_core.pretrain.synthetic import CLASSES_2D, synthetic2d


def main(folder: str, n: int = 5120, size: int = 32, seed: int = 0) -> None:
    x, labels = synthetic2d(n, size, seed=seed)
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]  # (n, H, W), the [0, 1] range kept
    for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
        os.makedirs(os.path.join(folder, CLASSES_2D[label]), exist_ok=True)
        name = os.path.join(folder, CLASSES_2D[label], f"{i:05d}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(image.numpy()).save(name, **({} if i % 2 else {"quality": 95}))
    print(f"wrote {n} images of {size}x{size} in {len(CLASSES_2D)} class folders to {folder}")


if __name__ == "__main__":
    main(sys.argv[1])
