package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"

	"github.com/bangerdev/banger/internal/errdefs"
)

const kernelCols = `id, name, managed, source, version, release, kernel, initrd, modules_dir, ref, digest, size_bytes, created_at`

func scanKernel(row interface{ Scan(...any) error }) (Kernel, error) {
	var k Kernel
	var created string
	err := row.Scan(&k.ID, &k.Name, &k.Managed, &k.Source, &k.Version, &k.Release, &k.Kernel, &k.Initrd, &k.ModulesDir,
		&k.Ref, &k.Digest, &k.SizeBytes, &created)
	k.CreatedAt = parseTime(created)
	return k, err
}

func insertKernel(ctx context.Context, tx *sql.Tx, k Kernel) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO kernels (`+kernelCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		k.ID, k.Name, k.Managed, sourceOr(k.Source), k.Version, k.Release, k.Kernel, k.Initrd, k.ModulesDir, k.Ref, k.Digest, k.SizeBytes, fmtTime(k.CreatedAt))
	if isUnique(err) {
		return fmt.Errorf("kernel %q: %w", k.Name, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return fmt.Errorf("insert kernel %q: %w", k.Name, err)
	}
	return writeFiles(ctx, tx, "kernel", k.ID, k.Name, k.Files)
}

func updateKernel(ctx context.Context, tx *sql.Tx, k Kernel) error {
	res, err := tx.ExecContext(ctx, `UPDATE kernels SET name=?, managed=?, source=?, version=?, release=?, kernel=?, initrd=?, modules_dir=?, ref=?, digest=?, size_bytes=? WHERE id=?`,
		k.Name, k.Managed, sourceOr(k.Source), k.Version, k.Release, k.Kernel, k.Initrd, k.ModulesDir, k.Ref, k.Digest, k.SizeBytes, k.ID)
	if isUnique(err) {
		return fmt.Errorf("kernel %q: %w", k.Name, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return fmt.Errorf("update kernel %q: %w", k.Name, err)
	}
	if n, err := res.RowsAffected(); err == nil && n == 0 {
		return fmt.Errorf("kernel %q: %w", k.Name, errdefs.ErrNotFound)
	}
	return writeFiles(ctx, tx, "kernel", k.ID, k.Name, k.Files)
}

// InsertKernel adds a kernel, with its Files. A duplicate name is
// errdefs.ErrAlreadyExists.
func (s *Store) InsertKernel(ctx context.Context, k Kernel) error {
	return s.inTx(ctx, "insert kernel "+k.Name, func(tx *sql.Tx) error { return insertKernel(ctx, tx, k) })
}

// UpdateKernel replaces a kernel's fields (by id), and its files when
// k.Files is not nil, in one transaction.
func (s *Store) UpdateKernel(ctx context.Context, k Kernel) error {
	return s.inTx(ctx, "update kernel "+k.Name, func(tx *sql.Tx) error { return updateKernel(ctx, tx, k) })
}

func (s *Store) inTx(ctx context.Context, what string, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// GetKernel finds a kernel by id or name; an id wins over a name.
func (s *Store) GetKernel(ctx context.Context, ref string) (Kernel, error) {
	k, err := scanKernel(s.db.QueryRowContext(ctx, `SELECT `+kernelCols+` FROM kernels WHERE name = ? OR id = ? ORDER BY id = ? DESC LIMIT 1`, ref, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return Kernel{}, fmt.Errorf("kernel %s: %w", errdefs.Quote(ref), errdefs.ErrNotFound)
	}
	if err != nil {
		return Kernel{}, fmt.Errorf("get kernel %s: %w", errdefs.Quote(ref), err)
	}
	return k, nil
}

// ListKernels returns all kernels by name.
func (s *Store) ListKernels(ctx context.Context) ([]Kernel, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+kernelCols+` FROM kernels ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list kernels: %w", err)
	}
	defer rows.Close()
	var out []Kernel
	for rows.Next() {
		k, err := scanKernel(rows)
		if err != nil {
			return nil, fmt.Errorf("list kernels: %w", err)
		}
		out = append(out, k)
	}
	return out, rows.Err()
}

// KernelUsers returns the names of the images booting a kernel and of
// the VMs booting it instead of their image's (vm create --kernel).
func (s *Store) KernelUsers(ctx context.Context, id string) (images, vms []string, err error) {
	return kernelUsers(ctx, s.db, id)
}

func kernelUsers(ctx context.Context, q querier, id string) (images, vms []string, err error) {
	if images, err = names(ctx, q, `SELECT name FROM images WHERE kernel_id = ? ORDER BY name`, id); err != nil {
		return nil, nil, fmt.Errorf("users of kernel %s: %w", id, err)
	}
	if vms, err = names(ctx, q, `SELECT name FROM vms WHERE kernel_id = ? ORDER BY name`, id); err != nil {
		return nil, nil, fmt.Errorf("users of kernel %s: %w", id, err)
	}
	return images, vms, nil
}

// DeleteKernel removes a kernel and its files' fingerprints. It fails
// with ErrFailedPrecondition, naming them, while an image or a VM uses it
// (checked in the same transaction).
func (s *Store) DeleteKernel(ctx context.Context, id string) error {
	return s.inTx(ctx, "delete kernel", func(tx *sql.Tx) error {
		images, vms, err := kernelUsers(ctx, tx, id)
		if err != nil {
			return err
		}
		if len(images)+len(vms) > 0 {
			return fmt.Errorf("kernel is used by %s: %w", usersText(images, vms), errdefs.ErrFailedPrecondition)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM kernels WHERE id = ?`, id); err != nil {
			return fmt.Errorf("delete kernel: %w", err)
		}
		return nil
	})
}

// usersText names a kernel's users: "image(s) a, b and VM(s) c: remove
// them first (or re-register the images with another kernel)".
func usersText(images, vms []string) string {
	var parts []string
	if len(images) > 0 {
		parts = append(parts, "image(s) "+strings.Join(images, ", "))
	}
	if len(vms) > 0 {
		parts = append(parts, "VM(s) "+strings.Join(vms, ", "))
	}
	return strings.Join(parts, " and ") + ": remove them first"
}
