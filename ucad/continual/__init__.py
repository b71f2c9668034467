"""The continual loop: tasks one after another, every seen task evaluated after each, with reports as hooks."""
