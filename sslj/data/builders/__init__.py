"""sslj's TensorFlow-free tfds builders; importing this registers them."""

from sslj.data.builders.cifar10 import SsljCifar10
from sslj.data.builders.digits import SsljDigits
from sslj.data.builders.fashion_mnist import SsljFashionMnist
from sslj.data.builders.image_folder import ImageFolderConfig
from sslj.data.builders.image_folder import SsljImageFolder
from sslj.data.builders.stl10 import SsljStl10
