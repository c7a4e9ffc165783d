"""The demo's artefacts: generated shape images with captions, and the pre-trained tiny LLaVA base."""
