"""FER pipeline library: data, models, training, evaluation, explanation and report.

Nothing here imports Airflow. Heavy libraries (TensorFlow, Keras, MLflow) are
imported only by the modules that need them, never by this package's `__init__`.
"""
