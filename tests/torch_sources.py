"""PyTorch networks with the module names and forward passes of the sources the importer reads
(torchvision-style ResNets as in chenyaofo/pytorch-cifar-models, huyvnphan/PyTorch_CIFAR10 and torchvision;
kuangliu-style ResNet/PreActResNet as in RobustBench; the TRADES and DeepMind WideResNets; torchvision-style VGG
and MobileNetV2), written here from their published structure so that the importer is checked against an
independent implementation.  Widths and depths are parameters so the tests can run them small.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and random BatchNorm statistics (affine and running), then eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return model.eval()


# --- torchvision-style ResNet (chenyaofo CifarResNet, huyvnphan, torchvision) -------------------------------
class TVBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class TVBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class TVResNet(nn.Module):
  def __init__(self, block, layers, widths, num_classes=10, stem_kernel=3, stem_stride=1, stem_pool=False):
    super().__init__()
    self.inplanes = widths[0]
    self.conv1 = nn.Conv2d(3, widths[0], stem_kernel, stem_stride, stem_kernel // 2, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
    for i, (n, w) in enumerate(zip(layers, widths)):
      setattr(self, f"layer{i + 1}", self._make_layer(block, w, n, 1 if i == 0 else 2))
    self.num_stages = len(layers)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


# --- kuangliu-style ResNet / PreActResNet (RobustBench) ----------------------------------------------------
class KLBasicBlock(nn.Module):
  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class KLPreActBlock(nn.Module):
  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    out = self.conv1(out)
    return self.conv2(F.relu(self.bn2(out))) + shortcut


class KLResNet(nn.Module):
  def __init__(self, block, num_blocks, widths, num_classes=10, preact=False, bn_before_fc=False):
    super().__init__()
    self.preact, self.bn_before_fc = preact, bn_before_fc
    self.in_planes = widths[0]
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    if not preact:
      self.bn1 = nn.BatchNorm2d(widths[0])
    for i, (n, w) in enumerate(zip(num_blocks, widths)):
      strides = [1 if i == 0 else 2] + [1] * (n - 1)
      layers = []
      for s in strides:
        layers.append(block(self.in_planes, w, s))
        self.in_planes = w
      setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
    self.num_stages = len(num_blocks)
    if bn_before_fc:
      self.bn = nn.BatchNorm2d(widths[-1])
    self.linear = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    out = self.conv1(x) if self.preact else F.relu(self.bn1(self.conv1(x)))
    for i in range(self.num_stages):
      out = getattr(self, f"layer{i + 1}")(out)
    if self.bn_before_fc:
      out = F.relu(self.bn(out))
    return self.linear(out.mean((2, 3)))


# --- TRADES / RobustBench WideResNet ------------------------------------------------------------------------
class TradesBlock(nn.Module):
  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equalInOut = in_planes == out_planes
    self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

  def forward(self, x):
    if not self.equalInOut:
      x = self.relu1(self.bn1(x))
      out = x
    else:
      out = self.relu1(self.bn1(x))
    out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
    return (x if self.equalInOut else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
  def __init__(self, nb_layers, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(
      *[TradesBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(nb_layers)]
    )

  def forward(self, x):
    return self.layer(x)


class TradesWideResNet(nn.Module):
  def __init__(self, depth=34, num_classes=10, widen_factor=10, sub_block1=True):
    super().__init__()
    ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
    self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
    if sub_block1:  # built by the TRADES class, unused in its forward
      self.sub_block1 = NetworkBlock(n, ch[0], ch[1], 1)
    self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
    self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
    self.bn1 = nn.BatchNorm2d(ch[3])
    self.relu = nn.ReLU(inplace=True)
    self.fc = nn.Linear(ch[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = self.relu(self.bn1(out))
    return self.fc(out.mean((2, 3)))


# --- DeepMind WideResNet (RobustBench DMWideResNet) ----------------------------------------------------------
class DMBlock(nn.Module):
  def __init__(self, in_planes, out_planes, stride, act):
    super().__init__()
    self.batchnorm_0 = nn.BatchNorm2d(in_planes)
    self.relu_0 = act()
    self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
    self.batchnorm_1 = nn.BatchNorm2d(out_planes)
    self.relu_1 = act()
    self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.has_shortcut = in_planes != out_planes
    self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) if self.has_shortcut else None
    self._stride = stride

  def forward(self, x):
    if self.has_shortcut:
      x = self.relu_0(self.batchnorm_0(x))
    else:
      out = self.relu_0(self.batchnorm_0(x))
    v = x if self.has_shortcut else out
    v = F.pad(v, (1, 1, 1, 1)) if self._stride == 1 else F.pad(v, (0, 1, 0, 1))
    out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
    return (self.shortcut(x) if self.has_shortcut else x) + out


class DMBlockGroup(nn.Module):
  def __init__(self, n, in_planes, out_planes, stride, act):
    super().__init__()
    self.block = nn.Sequential(
      *[DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, act) for i in range(n)]
    )

  def forward(self, x):
    return self.block(x)


class DMWideResNet(nn.Module):
  def __init__(
    self, num_classes=10, depth=28, width=10, act=nn.ReLU, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)
  ):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1))
    self.register_buffer("std", torch.tensor(std).view(3, 1, 1))
    ch = [16, 16 * width, 32 * width, 64 * width]
    n = (depth - 4) // 6
    self.init_conv = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
    self.layer = nn.Sequential(
      DMBlockGroup(n, ch[0], ch[1], 1, act),
      DMBlockGroup(n, ch[1], ch[2], 2, act),
      DMBlockGroup(n, ch[2], ch[3], 2, act),
    )
    self.batchnorm = nn.BatchNorm2d(ch[3])
    self.relu = act()
    self.logits = nn.Linear(ch[3], num_classes)

  def forward(self, x):
    out = self.layer(self.init_conv((x - self.mean) / self.std))
    out = self.relu(self.batchnorm(out))
    return self.logits(F.avg_pool2d(out, 8).flatten(1))


# --- torchvision-style VGG (chenyaofo, huyvnphan) -----------------------------------------------------------
class TVVGG(nn.Module):
  def __init__(self, cfg, hidden, num_classes=10, pool_to=None):
    super().__init__()
    layers, c = [], 3
    for v in cfg:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        c = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((pool_to, pool_to)) if pool_to else nn.Identity()
    k = (pool_to or 1) ** 2
    self.classifier = nn.Sequential(
      nn.Linear(c * k, hidden),
      nn.ReLU(True),
      nn.Dropout(),
      nn.Linear(hidden, hidden),
      nn.ReLU(True),
      nn.Dropout(),
      nn.Linear(hidden, num_classes),
    )

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- torchvision-style MobileNetV2 (torchvision, chenyaofo, huyvnphan) --------------------------------------
def make_divisible(v, divisor=8):
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU(nn.Sequential):
  def __init__(self, inp, out, kernel=3, stride=1, groups=1):
    super().__init__(
      nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
      nn.BatchNorm2d(out),
      nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    hidden = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers = [] if expand_ratio == 1 else [ConvBNReLU(inp, hidden, kernel=1)]
    layers += [
      ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
      nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
      nn.BatchNorm2d(oup),
    ]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


CIFAR_SETTING = [
  [1, 16, 1, 1],
  [6, 24, 2, 1],
  [6, 32, 3, 2],
  [6, 64, 4, 2],
  [6, 96, 3, 1],
  [6, 160, 3, 2],
  [6, 320, 1, 1],
]
IMAGENET_SETTING = [
  [1, 16, 1, 1],
  [6, 24, 2, 2],
  [6, 32, 3, 2],
  [6, 64, 4, 2],
  [6, 96, 3, 1],
  [6, 160, 3, 2],
  [6, 320, 1, 1],
]


class TVMobileNetV2(nn.Module):
  def __init__(self, num_classes=10, width_mult=1.0, setting=CIFAR_SETTING, stem_stride=1):
    super().__init__()
    inp = make_divisible(32 * width_mult)
    self.last_channel = make_divisible(1280 * max(1.0, width_mult))
    features = [ConvBNReLU(3, inp, stride=stem_stride)]
    for t, c, n, s in setting:
      out = make_divisible(c * width_mult)
      for i in range(n):
        features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
        inp = out
    features.append(ConvBNReLU(inp, self.last_channel, kernel=1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean([2, 3]))
