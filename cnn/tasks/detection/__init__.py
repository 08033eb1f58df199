"""Region-based detection: R-CNN, Fast R-CNN, Faster R-CNN."""
from cnn import tasks
from cnn.tasks.detection.task import DetectionTask

tasks.register('detection', DetectionTask)
