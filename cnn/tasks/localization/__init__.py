"""Classification + localization: a box head beside the class head."""
from cnn import tasks
from cnn.tasks.localization.task import LocalizationTask

tasks.register('localization', LocalizationTask)
