"""What a run leaves and where it goes: weights and run record, model card, hub upload, fused and converted
exports."""
