"""Model configuration, the demo model, and loading SDXL checkpoints onto a device."""
