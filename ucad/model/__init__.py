"""The model: a frozen timm backbone with task prompts, patch features, keys that route, knowledge that scores."""
