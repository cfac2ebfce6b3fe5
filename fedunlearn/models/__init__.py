"""Models: the registry and every registered network.

===============  ==========================================================  ==============
name             what                                                        module
===============  ==========================================================  ==============
``mlp``          multi-layer perceptron                                      :mod:`.small`
``cnn``          two 3x3 conv blocks, global pooling                         :mod:`.small`
``logistic``     multinomial logistic regression (the Newton step's model)   :mod:`.small`
``lenet5``       LeNet-5 (LeCun et al. 1998)                                 :mod:`.lenet`
``mcmahan_cnn``  the FedAvg paper's MNIST CNN (McMahan et al. 2017)          :mod:`.mcmahan`
``resnet20``     CIFAR ResNet-20 (He et al. 2016), GroupNorm or BatchNorm    :mod:`.resnet`
===============  ==========================================================  ==============

Every builder takes ``input_shape`` (without the batch axis) and ``num_classes`` and returns an
``torch.nn.Module``; :func:`build_model` builds one by name with seeded initial weights. Users
add their own with ``MODELS.register("name")``.
"""

from fedunlearn.models import lenet, mcmahan, resnet, small  # noqa: F401 - registers the models
from fedunlearn.models.registry import MODELS, ModelBuilder, build_model, reinitialise
from fedunlearn.models.small import cnn, logistic, mlp

__all__ = ["MODELS", "ModelBuilder", "build_model", "cnn", "logistic", "mlp", "reinitialise"]
