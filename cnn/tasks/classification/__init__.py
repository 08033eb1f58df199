"""Image classification: labels, cross-entropy, top-1 error."""
from cnn import tasks
from cnn.tasks.classification.task import ClassificationTask

tasks.register('classification', ClassificationTask)
