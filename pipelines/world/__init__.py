"""The procedural demo world: scenes, themes and attribute read-outs."""
