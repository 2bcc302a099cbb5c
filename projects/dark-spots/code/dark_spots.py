"""Demo Code hook: dark blobs on a bright part become rectangles labelled 'spot'."""

import cv2

seen_frames = 0  # module globals persist between frames


def main(context, form):
    global seen_frames
    seen_frames += 1
    image = context["image"]
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    _, dark = cv2.threshold(gray, form.get("max_gray", 60), 255, cv2.THRESH_BINARY_INV)
    count, _, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    for x, y, w, h, area in stats[1:count]:
        if area >= form.get("min_area", 30):
            context["detectedRectangles"].append({
                "x": int(x), "y": int(y), "width": int(w), "height": int(h),
                "confidence": 1.0, "classNames": [{"label": "spot", "color": "#ff0000"}],
            })
    context["frames_seen"] = seen_frames
