//! The transfers' blobs, packed in pages by size class (multiples of 8 bytes) instead of
//! one heap allocation each: a slot then finds its blob with 6 bytes (cell and length)
//! instead of a 16-byte box, and the allocator's own overhead per allocation (8 to 16
//! bytes) disappears. A freed cell is reused by the next blob of its class. Pages are
//! kept once made: like the slot vector, the arena holds its high-water mark.

const GRAIN: usize = 8;
const PAGE: usize = 16 * 1024;

/// Bytes a blob of `len` bytes occupies.
pub(super) fn cell_size(len: usize) -> usize {
    len.div_ceil(GRAIN).max(1) * GRAIN
}

#[derive(Default)]
struct Class {
    pages: Vec<Box<[u8]>>,
    free: Vec<u32>,
    /// Cells handed out so far (free or not).
    made: u32,
}

#[derive(Default)]
pub(super) struct Arena {
    classes: Vec<Class>,
}

/// Where cell `cell` of cells of `size` bytes lives: (page, offset).
fn locate(size: usize, cell: u32) -> (usize, usize) {
    let per_page = (PAGE / size).max(1);
    (cell as usize / per_page, cell as usize % per_page * size)
}

impl Arena {
    /// Stores `data` (at most 65 535 bytes); returns its cell.
    pub(super) fn alloc(&mut self, data: &[u8]) -> u32 {
        let size = cell_size(data.len());
        let class = size / GRAIN - 1;
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Class::default);
        }
        let c = &mut self.classes[class];
        let cell = match c.free.pop() {
            Some(cell) => cell,
            None => {
                let cell = c.made;
                c.made += 1;
                let (page, _) = locate(size, cell);
                if page >= c.pages.len() {
                    let per_page = (PAGE / size).max(1);
                    c.pages.push(vec![0; per_page * size].into_boxed_slice());
                }
                cell
            }
        };
        let (page, off) = locate(size, cell);
        if let Some(dst) = c.pages[page].get_mut(off..off + data.len()) {
            dst.copy_from_slice(data);
        }
        cell
    }

    /// The `len` bytes stored in `cell` (empty if there is no such cell).
    pub(super) fn get(&self, len: u16, cell: u32) -> &[u8] {
        let len = usize::from(len);
        let size = cell_size(len);
        let (page, off) = locate(size, cell);
        self.classes
            .get(size / GRAIN - 1)
            .and_then(|c| c.pages.get(page))
            .and_then(|p| p.get(off..off + len))
            .unwrap_or(&[])
    }

    pub(super) fn free(&mut self, len: u16, cell: u32) {
        if let Some(c) = self
            .classes
            .get_mut(cell_size(usize::from(len)) / GRAIN - 1)
        {
            c.free.push(cell);
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.classes
            .iter()
            .map(|c| c.pages.iter().map(|p| p.len()).sum::<usize>() + c.free.capacity() * 4)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_reused_and_never_overlap() {
        let mut a = Arena::default();
        let blobs: Vec<Vec<u8>> = (0..5000u32)
            .map(|i| vec![i as u8; (i % 300) as usize + 1])
            .collect();
        let cells: Vec<u32> = blobs.iter().map(|b| a.alloc(b)).collect();
        for (b, &c) in blobs.iter().zip(&cells) {
            assert_eq!(a.get(b.len() as u16, c), &b[..]);
        }
        for (b, &c) in blobs.iter().zip(&cells).step_by(2) {
            a.free(b.len() as u16, c);
        }
        let before = a.heap_bytes();
        for (b, _) in blobs.iter().zip(&cells).step_by(2) {
            a.alloc(b);
        }
        // Freed cells are reused: no new page.
        assert_eq!(a.heap_bytes(), before);
        for (b, &c) in blobs.iter().zip(&cells).skip(1).step_by(2) {
            assert_eq!(a.get(b.len() as u16, c), &b[..]);
        }
        assert_eq!(a.get(10, 999_999), &[] as &[u8]);
    }
}
