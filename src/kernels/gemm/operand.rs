//! GEMM operands: where a matrix lies inside its view, and the checks that every operand of a
//! matmul lies inside its view, in the shader's 32-bit indexing, without races.

use super::{Epilogue, Matmul, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, View};
use crate::kernels::expect_f16_support;

/// A matrix operand inside a view: element (r, col) of batch entry z is at
/// `offset + z * batch_stride + r * ld + col` (elements, row-major).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub view: &'a View,
    /// Elements before the first one.
    pub offset: usize,
    /// Row stride in elements.
    pub ld: usize,
    /// Distance between batch entries in elements; 0 shares one matrix across the batch.
    pub batch_stride: usize,
}

impl<'a> Operand<'a> {
    /// The matrix at the start of `view` with row stride `ld`, shared across any batch.
    pub fn new(view: &'a View, ld: usize) -> Self {
        Operand {
            view,
            offset: 0,
            ld,
            batch_stride: 0,
        }
    }

    /// The same operand starting `offset` elements into its view.
    pub fn at(self, offset: usize) -> Self {
        Operand { offset, ..self }
    }

    /// The same operand with batch entries `batch_stride` elements apart.
    pub fn batched(self, batch_stride: usize) -> Self {
        Operand {
            batch_stride,
            ..self
        }
    }
}

/// An operand's offset, row stride and batch stride as the shader sees them: the row stride of a
/// single row and the batch stride of a single entry are never used, so they are 0.
pub(super) fn normalized(op: &Operand, rows: usize, batch: usize) -> (usize, usize, usize) {
    let ld = if rows == 1 { 0 } else { op.ld };
    let bs = if batch == 1 { 0 } else { op.batch_stride };
    (op.offset, ld, bs)
}

/// Checks that `batch` matrices of `rows` × `cols` (as stored) lie inside the operand's view, rows
/// apart by at least a row, with every index within the shader's 32-bit arithmetic, and that the
/// view holds f32 (or f16 where `f16_ok`). `role` names the operand ("a", "b", "c") in messages.
fn check_operand(
    kernel: &str,
    role: &str,
    op: &Operand,
    (rows, cols, batch): (usize, usize, usize),
    f16_ok: bool,
) -> Result<()> {
    let v = op.view;
    let shape = |expected: String, got: String| Error::Shape {
        kernel: kernel.to_string(),
        tensor: v.name.to_string(),
        expected,
        got,
    };
    let dtype_ok = v.dtype == DType::F32 || (f16_ok && v.dtype == DType::F16);
    if !dtype_ok {
        let want = if f16_ok { "f32 or f16" } else { "f32" };
        return Err(shape(
            format!("{want} elements (operand {role})"),
            format!("{} elements", v.dtype.name()),
        ));
    }
    let (offset, ld, bs) = normalized(op, rows, batch);
    if rows > 1 && ld < cols {
        return Err(shape(
            format!("a row stride of at least {cols} (operand {role}, {rows} x {cols} as stored)"),
            format!("row stride {ld}"),
        ));
    }
    // One past the last element the operand covers; u128 cannot overflow here.
    let end = offset as u128
        + (batch as u128 - 1) * bs as u128
        + (rows as u128 - 1) * ld as u128
        + cols as u128;
    if end > v.len as u128 {
        return Err(shape(
            format!(
                "at least {end} elements (operand {role}: {batch} x {rows} x {cols} as stored, \
                 offset {offset}, row stride {ld}, batch stride {bs})"
            ),
            format!("{} elements", v.len),
        ));
    }
    if end > u32::MAX as u128 {
        return Err(Error::invalid(
            kernel,
            format!(
                "tensor {}: operand {role} reaches element {end}, past 32-bit indexing",
                v.name
            ),
        ));
    }
    Ok(())
}

/// Batch entries of C must not overlap (they would race): each entry stacked after the previous
/// one, or entries side by side within one row stride.
fn check_disjoint(kernel: &str, c: &Operand, m: usize, n: usize, batch: usize) -> Result<()> {
    if batch == 1 {
        return Ok(());
    }
    let (_, ld, bs) = normalized(c, m, batch);
    let extent = (m as u128 - 1) * ld as u128 + n as u128;
    let stacked = bs as u128 >= extent;
    let side_by_side =
        bs >= n && m > 1 && (batch as u128 - 1) * bs as u128 + n as u128 <= ld as u128;
    if stacked || side_by_side {
        return Ok(());
    }
    Err(Error::Shape {
        kernel: kernel.to_string(),
        tensor: c.view.name.to_string(),
        expected: format!(
            "batch entries that do not overlap (operand c: batch stride at least {extent}, or \
             at least {n} with all {batch} entries within the row stride {ld})"
        ),
        got: format!("batch stride {bs}"),
    })
}

/// Whether the shader may read the operand as vec4: its view holds whole vec4s and every row
/// and batch entry starts at a multiple of 4, so every aligned vec4 it touches is in the view.
/// A vec4<f16> is 8 bytes, so an f16 view must also start at a multiple of 8 bytes (a device's
/// storage offset alignment may be as small as 4).
pub(super) fn vec4_ok(op: &Operand, rows: usize, batch: usize) -> bool {
    let (offset, ld, bs) = normalized(op, rows, batch);
    let aligned = op.view.dtype != DType::F16 || op.view.offset.is_multiple_of(8);
    aligned
        && [op.view.len, offset, ld, bs]
            .iter()
            .all(|x| x.is_multiple_of(4))
}

/// Checks the shape, every operand and the bias of a matmul for the kernel named `name`.
pub(super) fn check_matmul_args(
    gpu: &Gpu,
    name: &str,
    mm: &Matmul,
    (c, a, b): (&Operand, &Operand, &Operand),
    bias: Option<&View>,
) -> Result<()> {
    let Matmul { m, n, k, batch, .. } = *mm;
    expect_dims(name, &[("M", m), ("N", n), ("K", k), ("batch", batch)])?;
    let ((ar, ac), (br, bc)) = mm.stored();
    check_operand(name, "a", a, (ar, ac, batch), false)?;
    check_operand(name, "b", b, (br, bc, batch), true)?;
    check_operand(name, "c", c, (m, n, batch), false)?;
    expect_f16_support(gpu, name, b.view)?;
    check_disjoint(name, c, m, n, batch)?;
    let reads = [("a", a.view), ("b", b.view)]
        .into_iter()
        .chain(bias.map(|v| ("bias", v)));
    for (role, x) in reads {
        if x.buffer == c.view.buffer {
            return Err(Error::invalid(
                name,
                format!(
                    "tensor {} (operand c) shares a buffer with tensor {} (operand {role}); a \
                     dispatch cannot write a buffer it reads",
                    c.view.name, x.name
                ),
            ));
        }
    }
    if let Some(bias) = bias {
        expect(name, bias, DType::F32, n)?;
    }
    check_epilogue(name, mm, c, [a.view, b.view].into_iter().chain(bias))
}

/// The epilogue's tensor: laid out as C's view, f32, apart from every operand the dispatch
/// reads; GELU forms overwrite C, and an f16 B has no epilogue.
fn check_epilogue<'v>(
    name: &str,
    mm: &Matmul,
    c: &Operand<'v>,
    reads: impl Iterator<Item = &'v View>,
) -> Result<()> {
    let (_, Some(aux)) = mm.epilogue.code() else {
        return Ok(());
    };
    expect(name, aux, DType::F32, c.view.len)?;
    let gelu = matches!(
        mm.epilogue,
        Epilogue::Gelu { .. } | Epilogue::GeluBackward { .. }
    );
    if gelu && mm.accumulate {
        return Err(Error::invalid(
            name,
            "a GELU epilogue overwrites C; it cannot accumulate",
        ));
    }
    for x in reads.chain([c.view]) {
        if x.dtype == DType::F16 {
            return Err(Error::invalid(
                name,
                format!("no epilogue with an f16 operand ({})", x.name),
            ));
        }
        if x.buffer == aux.buffer {
            return Err(Error::invalid(
                name,
                format!(
                    "the epilogue's tensor {} shares a buffer with operand {}",
                    aux.name, x.name
                ),
            ));
        }
    }
    Ok(())
}
