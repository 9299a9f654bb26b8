"""The networks: the encoders (the tutorial's ResNet50V2, SCAN's CIFAR ResNet-18, a small CNN for CPUs), SimCLR's
projection heads, and the clustering head and model.
"""

import keras
from keras import layers

ENCODER_MINIMUM_SIZES = {"resnet50v2": 32, "resnet18": 8, "small": 8}  # smallest TARGET_SIZE of each encoder


def create_encoder(encoder_name, representation_dim, torch_conventions=False):
    """The backbone, then a dense layer of `representation_dim` units (the tutorial's; none when 0, as in SCAN)."""
    # Any image side: SimCLR may train on smaller views (VIEW_SIZE) than the TARGET_SIZE images it then embeds.
    dense = [layers.Dense(representation_dim)] if representation_dim else []
    return keras.Sequential(
        [keras.Input((None, None, 3)), create_backbone(encoder_name, torch_conventions), *dense], name="encoder"
    )


def create_backbone(encoder_name, torch_conventions=False):
    """The convolutional part of the encoder: images -> pooled features. `torch_conventions` builds the ResNet-18
    and the small CNN as SCAN's PyTorch code does (see `conv_block`); ResNet50V2 is Keras's own."""
    if encoder_name == "resnet50v2":
        return keras.applications.ResNet50V2(include_top=False, weights=None, pooling="avg")
    if encoder_name == "resnet18":
        return create_cifar_resnet18(torch_conventions)
    # The small CNN's first convolution has a bias instead of batch normalisation: normalising its large
    # 32-channel map cost a quarter of a SimCLR step on a CPU and did not change the neighbours' purity.
    return keras.Sequential(
        [
            layers.Conv2D(32, 3, padding="same", kernel_initializer=convolution_initializer(torch_conventions)),
            layers.ReLU(),  # 32x32
            layers.MaxPooling2D(),
            *conv_block(64, torch_conventions=torch_conventions),  # 16x16
            layers.MaxPooling2D(),
            *conv_block(128, torch_conventions=torch_conventions),  # 8x8
            layers.MaxPooling2D(),
            *conv_block(256, torch_conventions=torch_conventions),  # 4x4
            layers.GlobalAveragePooling2D(),
        ],
        name="small_cnn",
    )


def convolution_initializer(torch_conventions):
    """Keras's Glorot-uniform, or SCAN's He-normal of the fan-out (`kaiming_normal_(mode="fan_out")`)."""
    if torch_conventions:
        return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")
    return "glorot_uniform"


def conv_block(filters, strides=1, torch_conventions=False):
    """3x3 convolution, batch normalisation, ReLU.

    With `torch_conventions`, as PyTorch builds them: a stride-2 convolution pads one pixel on every side, so its
    output pixel i is centred on input pixel 2i, where the 1x1 shortcut of a residual block samples (Keras's "same"
    pads only after, centring it on 2i + 1, half a stride away); batch normalisation keeps 0.9 of its running
    statistics per step (PyTorch's momentum 0.1) with epsilon 1e-5; the convolution's init is He-normal.
    """
    padding = [layers.ZeroPadding2D(1)] if torch_conventions and strides != 1 else []
    return [
        *padding,
        layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="valid" if padding else "same",
            use_bias=False,
            kernel_initializer=convolution_initializer(torch_conventions),
        ),
        batch_normalization(torch_conventions),
        layers.ReLU(),
    ]


def batch_normalization(torch_conventions):
    """Keras's batch normalisation, or PyTorch's: 0.9 of the running statistics kept per step, epsilon 1e-5."""
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5) if torch_conventions else layers.BatchNormalization()


def create_cifar_resnet18(torch_conventions=False):
    """ResNet-18 for 32x32 images, as in the SCAN code: 512 pooled features, about 11.2M parameters."""
    inputs = keras.Input((None, None, 3))
    x = inputs
    for layer in conv_block(64, torch_conventions=torch_conventions):
        x = layer(x)
    for filters, strides in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        x = basic_block(x, filters, strides, torch_conventions)
        x = basic_block(x, filters, 1, torch_conventions)
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name="resnet18")


def basic_block(x, filters, strides, torch_conventions=False):
    """Two 3x3 convolutions with a shortcut, projected by a 1x1 convolution when the shape changes."""
    residual = x
    for layer in conv_block(filters, strides, torch_conventions):
        residual = layer(residual)
    initializer = convolution_initializer(torch_conventions)
    residual = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=initializer)(residual)
    residual = batch_normalization(torch_conventions)(residual)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False, kernel_initializer=initializer)(x)
        shortcut = batch_normalization(torch_conventions)(shortcut)
    return layers.ReLU()(layers.Add()([residual, shortcut]))


def create_projection_head(kind, units, encoder_units, dropout_rate):
    """The projection head after the encoder: the tutorial's (dropout, dense, batch norm, ReLU); with `kind` "mlp"
    SimCLR's two-layer MLP (dense of the encoder's `encoder_units` with ReLU, then dense); with "vicreg" VICReg's
    expander (dense, batch norm, ReLU, twice, then dense; every layer `units` wide, as solo-learn's 2048-2048-2048)."""
    if kind == "tutorial":
        head = [
            layers.Dropout(dropout_rate),
            layers.Dense(units=units, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
        ]
    elif kind == "vicreg":
        hidden = [[layers.Dense(units), layers.BatchNormalization(), layers.ReLU()] for _ in range(2)]
        head = [*hidden[0], *hidden[1], layers.Dense(units)]
    else:
        head = [layers.Dense(encoder_units, activation="relu"), layers.Dense(units)]
    return keras.Sequential(head, name="projector")


def create_clustering_head(num_clusters, cached_features=None, num_heads=1):
    """The tutorial's softmax layer over the encoder's features: [batch_size, num_clusters] (a Dense layer, then a
    Softmax, so that self-labeling can learn on the logits). With `num_heads` > 1, that many softmax layers side by
    side: [batch_size, num_heads, num_clusters]. When the head learns on `cached_features` (ENCODER_DURING_CLUSTERING
    = "cached"), it first L2-normalises and standardises them with their mean and variance: on a frozen encoder's
    features that conditioning is worth several points of accuracy."""
    head = [layers.Dense(units=num_clusters, dtype="float32"), layers.Softmax(dtype="float32")]
    if num_heads > 1:
        head = [
            layers.Dense(units=num_heads * num_clusters, dtype="float32"),
            layers.Reshape((num_heads, num_clusters), dtype="float32"),
            layers.Softmax(dtype="float32"),
        ]
    if cached_features is not None:
        unit_normalize, standardize = layers.UnitNormalization(dtype="float32"), layers.Normalization(dtype="float32")
        standardize.adapt(unit_normalize(cached_features))
        head = [unit_normalize, standardize, *head]
    return keras.Sequential(head, name="clustering_head")


def create_clustering_model(encoder, clustering_head, input_size, data_preprocessing, name=None):
    inputs = keras.Input(shape=(input_size, input_size, 3))
    # Preprocess the input images.
    preprocessed = data_preprocessing(inputs)
    # Generate embedding representations of the images.
    features = encoder(preprocessed)
    # Assign the images to clusters.
    outputs = clustering_head(features)
    # Create the model.
    return keras.Model(inputs=inputs, outputs=outputs, name=name)


def copy_head(heads, head, index):
    """Copies head `index` of the side-by-side `heads` into the single `head`; the layers before their Dense match."""
    for source, target in zip(heads.layers, head.layers, strict=False):  # `heads` ends in Reshape and Softmax
        if isinstance(target, layers.Dense):
            kernel, bias = source.get_weights()
            columns = slice(index * target.units, (index + 1) * target.units)
            target.set_weights([kernel[:, columns], bias[columns]])
            return
        target.set_weights(source.get_weights())


def clustering_logits_model(clustering_model):
    """The clustering model (or the head alone) without the head's last layer, its softmax: the same layers and
    weights, logits out."""
    if isinstance(clustering_model, keras.Sequential):  # the head, on cached features
        return keras.Sequential(clustering_model.layers[:-1], name="clustering_logits")
    inputs = keras.Input(shape=clustering_model.inputs[0].shape[1:])
    outputs = inputs
    for layer in clustering_model.layers:  # preprocessing, encoder, head: a chain
        if isinstance(layer, layers.InputLayer):
            continue
        for part in layer.layers[:-1] if layer.name == "clustering_head" else [layer]:
            outputs = part(outputs)
    return keras.Model(inputs, outputs, name="clustering_logits")
