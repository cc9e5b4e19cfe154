"""What the operators and sensors share: below them, above the triggers."""
