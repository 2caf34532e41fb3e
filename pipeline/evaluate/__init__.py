"""Evaluation: COCO scoring, distributed inference and gathering, the eval job, `panet eval`.

Import from the modules (`pipeline.evaluate.scoring`, `.distributed`, `.job`, `.cli`): this
file imports nothing, so `panet --help` does not load pycocotools or torch.
"""
