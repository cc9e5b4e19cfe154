"""What the operators and sensors share: below them, above the triggers (``metrics``: a leaf they use too)."""
