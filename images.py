"""An image as the processor and vLLM take it: opened from whatever a row holds (PIL, bytes, a
path, datasets' {"bytes", "path"}), RGB as it is meant to be seen, and resized so that its area
lies in the run's [min_pixels, max_pixels]. data.build_prompt calls them."""
import io
import math
import os

from PIL import Image


def to_rgb(img):
    """Any PIL mode -> RGB as meant to be seen: transparency on white (a plain convert makes it
    black, and black line art vanishes; vLLM's loader and qwen-vl-utils paste RGBA on white),
    16-bit grayscale scaled to 8 bits (a plain convert clips it, mostly to white)."""
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit samples, 65535 is white
        img = img.convert("I").point(lambda v: v / 257)
    if img.has_transparency_data:  # RGBA, LA, PA, or P / L / RGB with a transparent colour
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def resize_image(img, min_pixels, max_pixels):
    """Scale an image (keeping its aspect ratio) so its area lies in [min_pixels, max_pixels] and
    its short side is >= 28 px, the processor's unit (older smart_resize rejects less), which wins
    over max_pixels. An aspect ratio over 200 (also rejected) is never made: the long side is capped
    at 200 short sides (rounding the short side down turned 10000x50 into 5780x28)."""
    img = to_rgb(img)
    w, h = img.size
    scale = max(math.sqrt(min(max(w * h, min_pixels), max_pixels) / (w * h)), 28 / min(w, h))
    if scale != 1.0:
        short = max(28, int(min(w, h) * scale))
        long = max(28, min(int(max(w, h) * scale), 200 * short))
        img = img.resize((long, short) if w >= h else (short, long))
    return img


def to_pil(image, root=None):
    """PIL, bytes, a path (a relative one from `root`, the data file's folder) or datasets'
    undecoded {"bytes", "path"} -> PIL (opened lazily: a corrupt image fails on first use)."""
    if isinstance(image, Image.Image):
        return image
    image = (image.get("bytes") or image.get("path")) if isinstance(image, dict) else image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    return Image.open(os.path.join(root, image) if root and isinstance(image, str) else image)
