"""Under N ranks: train_distributed on OR; print each rank's final parameters as JSON."""
import json

from course_lib import logistic_regression as lr
from course_lib.distributed import print_line

X, y = lr.or_dataset()
params, history = lr.train_distributed(X, y, learning_rate=1.0, epochs=50)
print_line(json.dumps({"w": params["w"].tolist(), "b": params["b"].item(),
                       "losses": [h["loss"] for h in history]}))
