"""The model: a frozen timm backbone with task prompts, patch features, keys that route an image to its task, knowledge that scores it."""
