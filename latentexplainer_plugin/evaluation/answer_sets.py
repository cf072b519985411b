"""Labelled sets of five answers about one latent, for measuring certainty measures.

Each set is what n = 5 samples could say about one traversal. ``AGREEING`` sets describe one
change in different words (close paraphrases, as resampling one prompt gives, and loose ones with
synonyms); ``DISAGREEING`` sets name different attributes, or one attribute in opposite directions
(the contradictions that sentence embeddings score as agreement). A good certainty measure puts
every agreeing set above its threshold and every disagreeing set below it
(``benchmarks/bench_certainty.py`` prints the numbers; tests/test_uncertainty.py checks them).
"""

from __future__ import annotations

CLOSE_PARAPHRASES: dict[str, list[str]] = {
    "position": [
        "Increasing z3 moves the object from left to right.",
        "As z3 increases, the object moves from the left to the right.",
        "The object moves from left to right as z3 increases.",
        "Increasing z3 moves the object to the right.",
        "Increasing z3 shifts the object from the left side to the right side.",
    ],
    "size": [
        "Increasing z1 makes the object larger.",
        "As z1 increases, the object becomes larger.",
        "The object gets larger as z1 increases.",
        "Increasing z1 makes the object larger and fill more of the image.",
        "Increasing z1 increases the size of the object, making it larger.",
    ],
    "rotation": [
        "Increasing z5 rotates the object clockwise.",
        "As z5 increases, the object rotates clockwise.",
        "The object rotates clockwise as z5 increases.",
        "Increasing z5 rotates the shape clockwise.",
        "Increasing z5 makes the object rotate in the clockwise direction.",
    ],
    "brightness": [
        "Increasing z2 makes the background brighter.",
        "As z2 increases, the background becomes brighter.",
        "The background gets brighter as z2 increases.",
        "Increasing z2 makes the background brighter and lighter.",
        "Increasing z2 increases the brightness of the background, making it brighter.",
    ],
    "colour": [
        "Increasing z4 changes the colour of the object from red to blue.",
        "As z4 increases, the object's colour changes from red to blue.",
        "The colour of the object changes from red to blue as z4 increases.",
        "Increasing z4 changes the object colour from red to blue.",
        "Increasing z4 turns the colour of the object from red to blue.",
    ],
}

LOOSE_PARAPHRASES: dict[str, list[str]] = {
    "position": [
        "Increasing z3 moves the object from left to right.",
        "As z3 increases, the object shifts to the right.",
        "The object slides horizontally towards the right as z3 grows.",
        "Raising z3 moves the shape rightwards across the image.",
        "Increasing z3 translates the object from the left side to the right side.",
    ],
    "size": [
        "Increasing z1 makes the object larger.",
        "As z1 increases, the object grows in size.",
        "The shape becomes bigger as z1 goes up.",
        "Raising z1 enlarges the object.",
        "Increasing z1 scales the object up so it takes more of the image.",
    ],
    "rotation": [
        "Increasing z5 rotates the object clockwise.",
        "As z5 increases, the object turns clockwise.",
        "The shape spins in the clockwise direction as z5 grows.",
        "Raising z5 rotates the object to the right, clockwise.",
        "Increasing z5 changes the orientation of the object, turning it clockwise.",
    ],
    "brightness": [
        "Increasing z2 makes the background brighter.",
        "As z2 increases, the background becomes lighter.",
        "The background gets brighter as z2 goes up.",
        "Raising z2 lightens the background.",
        "Increasing z2 increases the brightness of the background.",
    ],
    "colour": [
        "Increasing z4 changes the colour of the object from red to blue.",
        "As z4 increases, the object turns from red to blue.",
        "The object's colour shifts from red towards blue as z4 grows.",
        "Raising z4 makes the red object become blue.",
        "Increasing z4 changes the object's hue from red to blue.",
    ],
}

# Loose paraphrases of the changes that come in pairs of opposite directions.
MORE_PARAPHRASES: dict[str, list[str]] = {
    "vertical": [
        "Increasing z1 moves the object up.",
        "The object rises towards the top of the image as z1 increases.",
        "As z1 grows, the shape moves upward.",
        "Raising z1 lifts the object from the bottom to the top.",
        "The object travels upwards in the frame when z1 increases.",
    ],
    "vertical-down": [
        "Increasing z1 moves the object down.",
        "The object sinks towards the bottom of the image as z1 increases.",
        "As z1 grows, the shape moves downward.",
        "Raising z1 moves the object from the top to the bottom.",
        "The object descends in the frame when z1 increases.",
    ],
    "shrink": [
        "Increasing z8 makes the object smaller.",
        "The object shrinks as z8 increases.",
        "As z8 grows, the shape gets smaller and smaller.",
        "Raising z8 reduces the size of the object.",
        "The square becomes tinier when z8 goes up.",
    ],
}

DIFFERENT_CHANGES: list[str] = [
    "Increasing z3 moves the object from left to right.",
    "Increasing z3 makes the object larger.",
    "Increasing z3 rotates the object clockwise.",
    "Increasing z3 makes the background brighter.",
    "Increasing z3 changes the colour of the object from red to blue.",
]

DIFFERENT_CHANGES_VARIED: list[str] = [
    "Increasing z3 moves the object from left to right.",
    "As z3 increases, the object becomes larger.",
    "The object rotates clockwise as z3 increases.",
    "Increasing z3 makes the background brighter.",
    "When z3 goes up, the colour of the object changes from red to blue.",
]

# One attribute, opposite directions (3 vs 2 or 2 vs 2 vs 1): no agreement on what happens.
CONTRADICTIONS: dict[str, list[str]] = {
    "up-down": [
        "Increasing z2 moves the object up.",
        "Increasing z2 moves the object down.",
        "As z2 increases, the object rises.",
        "As z2 increases, the object sinks.",
        "The object moves upward as z2 grows.",
    ],
    "bigger-smaller": [
        "Increasing z2 makes the object bigger.",
        "Increasing z2 makes the object smaller.",
        "The object grows as z2 increases.",
        "The object shrinks as z2 increases.",
        "As z2 increases, the object gets larger.",
    ],
    "left-right": [
        "Increasing z2 moves the object to the left.",
        "Increasing z2 moves the object to the right.",
        "The object shifts from left to right as z2 increases.",
        "The object shifts from right to left as z2 increases.",
        "As z2 grows, the object slides to the left.",
    ],
    "brighter-darker": [
        "Increasing z2 makes the background brighter.",
        "Increasing z2 makes the background darker.",
        "The background darkens as z2 increases.",
        "The background lightens as z2 increases.",
        "As z2 increases, the background becomes brighter.",
    ],
    "clockwise-counter": [
        "Increasing z2 rotates the object clockwise.",
        "Increasing z2 rotates the object counterclockwise.",
        "The object turns anticlockwise as z2 increases.",
        "The object spins clockwise as z2 grows.",
        "As z2 increases, the object rotates counter-clockwise.",
    ],
    # what the offline explainer said about pure-noise directions of a random-weight UNet
    "noise-colours": [
        "Increasing d0 changes the object's colour from green to magenta.",
        "Increasing d0 changes the object's colour from purple to green.",
        "Increasing d0 changes the object's colour from yellow to green.",
        "Increasing d0 changes the object's colour from magenta to yellow.",
        "Increasing d0 changes the object's colour from green to purple.",
    ],
    "noise-mixed": [
        "Increasing d1 changes the object's colour from green to magenta.",
        "Increasing d1 changes its shape, making it more compact (rounder).",
        "Increasing d1 makes the object smaller.",
        "Increasing d1 changes the object's colour from purple to green.",
        "Increasing d1 makes the object larger.",
    ],
}

# Realistic free-form answers of a chat model about one change (varied wording and length).
CHAT_PARAPHRASES: dict[str, list[str]] = {
    "x": [
        "As the latent value increases, the shape slides horizontally from the left edge toward the right edge.",
        "The main change is the object's horizontal position: it travels to the right.",
        "Moving along this latent shifts the object rightwards while its size and colour stay the same.",
        "The object is displaced to the right across the frame.",
        "Horizontal translation: the square starts on the left and ends on the right.",
    ],
    "hue": [
        "The colour of the shape changes, going from blue through purple to red.",
        "The object's hue shifts from blue to red across the strip.",
        "It turns from a blue object into a red one.",
        "Colour is what varies: blue at the start, red at the end.",
        "The shape's colour moves from blue towards red while it stays in place.",
    ],
}

AGREEING: dict[str, list[str]] = (
    {f"close {k}": v for k, v in CLOSE_PARAPHRASES.items()}
    | {f"loose {k}": v for k, v in LOOSE_PARAPHRASES.items()}
    | {f"loose {k}": v for k, v in MORE_PARAPHRASES.items()}
    | {f"chat {k}": v for k, v in CHAT_PARAPHRASES.items()}
)
DISAGREEING: dict[str, list[str]] = (
    {"different changes": DIFFERENT_CHANGES, "different changes (varied)": DIFFERENT_CHANGES_VARIED}
    | {f"contradiction {k}": v for k, v in CONTRADICTIONS.items()}
)
