"""Small utilities shared by tools, tests and the main job."""
