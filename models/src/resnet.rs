//! ResNet (torchvision, v1.5: the stride of a bottleneck is on its 3x3 conv): `resnet18`,
//! `resnet50`; `layers` picks the depth among 18, 34, 50, 101, 152 and `hidden` the stem width.
//!
//! Structure, names as torchvision's: `conv1` (7x7, stride 2, no bias), `bn1`, ReLU, 3x3 max
//! pool stride 2; `layer1..4` of BasicBlocks (`conv1`, `bn1`, `conv2`, `bn2`) or Bottlenecks
//! (`conv1` 1x1, `conv2` 3x3, `conv3` 1x1 to 4x width, with BNs), with `downsample.0` (1x1 conv)
//! and `downsample.1` (BN) where the shape changes; global average pool (a mean over H, W);
//! `fc`. BatchNorm runs in training mode (batch statistics) when `training`; its running
//! statistics are buffers, not parameters: resnet18 has 11,689,512 parameters, resnet50
//! 25,557,032.
//!
//! Inputs: `images` `[B, channels, image_size, image_size]` (model dtype), `labels` i64 `[B]`.
//! Loss: mean cross entropy of the logits `[B, num_classes]`.

use crate::config::resnet_stages;
use crate::nn::{Net, R};
use autopar_analyzer::ops::pool::PoolKind;
use autopar_analyzer::ops::reduce::ReduceKind;
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ops::Pool;
use autopar_analyzer::{AnalyzerError, DType, ValueId};

fn relu(n: &mut Net<'_>, leaf: &str, x: ValueId) -> R {
    n.unary(leaf, UnaryKind::Relu, x)
}

/// One residual block in the current scope; `planes` is the block's base width.
fn block(n: &mut Net<'_>, x: ValueId, planes: usize, stride: usize, bottleneck: bool) -> R {
    let cin = n.shape(x).get(1).copied().unwrap_or(0);
    let expansion = if bottleneck { 4 } else { 1 };
    let cout = planes * expansion;
    let y = if bottleneck {
        let y = n.conv2d("conv1", x, planes, 1, 1, 0, false)?;
        let y = n.batch_norm("bn1", y)?;
        let y = relu(n, "relu1", y)?;
        let y = n.conv2d("conv2", y, planes, 3, stride, 1, false)?;
        let y = n.batch_norm("bn2", y)?;
        let y = relu(n, "relu2", y)?;
        let y = n.conv2d("conv3", y, cout, 1, 1, 0, false)?;
        n.batch_norm("bn3", y)?
    } else {
        let y = n.conv2d("conv1", x, planes, 3, stride, 1, false)?;
        let y = n.batch_norm("bn1", y)?;
        let y = relu(n, "relu1", y)?;
        let y = n.conv2d("conv2", y, planes, 3, 1, 1, false)?;
        n.batch_norm("bn2", y)?
    };
    let identity = if stride != 1 || cin != cout {
        n.scope("downsample", |n| {
            let d = n.conv2d("0", x, cout, 1, stride, 0, false)?;
            n.batch_norm("1", d)
        })?
    } else {
        x
    };
    let y = n.add("residual", y, identity)?;
    relu(n, "relu", y)
}

pub(crate) fn build(net: &mut Net<'_>) -> R<ValueId> {
    let c = net.cfg;
    let (bottleneck, blocks) = resnet_stages(c.layers).ok_or_else(|| {
        AnalyzerError::Other(format!("resnet depth {} is not supported", c.layers))
    })?;
    let dt = net.dtype();
    let images = net.input(
        "images",
        dt,
        &[c.batch, c.channels, c.image_size, c.image_size],
    );
    let labels = net.input("labels", DType::I64, &[c.batch]);
    let w = c.hidden;

    let x = net.conv2d("conv1", images, w, 7, 2, 3, false)?;
    let x = net.batch_norm("bn1", x)?;
    let x = relu(net, "relu", x)?;
    let mut x = net.op(
        "maxpool",
        Pool {
            kind: PoolKind::Max,
            kernel: vec![3, 3],
            strides: vec![2, 2],
            pads: vec![[1, 1], [1, 1]],
            dilations: vec![1, 1],
            count_include_pad: false,
            ceil_mode: false,
        },
        &[x],
    )?;
    for (stage, &count) in blocks.iter().enumerate() {
        let planes = w << stage;
        let first_stride = if stage == 0 { 1 } else { 2 };
        for j in 0..count {
            let stride = if j == 0 { first_stride } else { 1 };
            x = net.scope(format!("layer{}.{j}", stage + 1), |n| {
                block(n, x, planes, stride, bottleneck)
            })?;
        }
    }
    let x = net.reduce("avgpool", ReduceKind::Mean, x, &[2, 3])?;
    let logits = net.linear("fc", x, c.num_classes, true)?;
    net.cross_entropy("loss", logits, labels, None)
}
