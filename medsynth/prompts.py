"""The class template shared by captioning, fine-tuning and synthesis.

"A/An {modality} image of {category}" (the paper's simple caption, and the required prefix of
every VLM caption).
"""

from __future__ import annotations

# Words starting with a vowel letter but a consonant sound, and the reverse.
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir", "mri", "mr ", "x-ray", "xray", "fmri", "ct ", "ecg", "eeg", "hdr", "rgb", "nmr")
_A_EXCEPTIONS = ("uni", "use", "usu", "uro", "eu", "one", "once", "ultrasound-guided-uni")


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (by sound for common medical words)."""
    w = word.strip().lower()
    if not w:
        return "a"
    if w.startswith(_AN_EXCEPTIONS) or w in ("mr", "ct"):
        return "an"
    if w.startswith(_A_EXCEPTIONS):
        return "a"
    return "an" if w[0] in "aeiou" else "a"


def simple_caption(modality: str, category: str) -> str:
    """'A dermoscopic image of melanoma' / 'An endoscopic image of polyps'."""
    return f"{article(modality).capitalize()} {modality} image of {category}"


def fill_template(template: str, modality: str, category: str, visual_features: str) -> str:
    """Fill {Article} {article} {modality} {category} {visual_features} in a prompt template."""
    art = article(modality)
    return template.format(Article=art.capitalize(), article=art, modality=modality,
                           category=category, visual_features=visual_features)
