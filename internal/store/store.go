// Package store keeps bangerd's state (images and VMs) in SQLite
// (modernc.org/sqlite, WAL) with versioned schema migrations.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	_ "modernc.org/sqlite" // database/sql driver "sqlite"

	"github.com/bangerdev/banger/internal/errdefs"
)

// migrations are applied in order; migration i brings the schema to
// version i+1. Never edit a released migration: append a new one.
var migrations = []string{
	`CREATE TABLE images (
		id          TEXT PRIMARY KEY,
		name        TEXT NOT NULL UNIQUE,
		managed     INTEGER NOT NULL DEFAULT 0,
		rootfs      TEXT NOT NULL,
		kernel      TEXT NOT NULL,
		initrd      TEXT NOT NULL DEFAULT '',
		modules_dir TEXT NOT NULL DEFAULT '',
		size_bytes  INTEGER NOT NULL DEFAULT 0,
		created_at  TEXT NOT NULL
	);
	CREATE TABLE vms (
		id            TEXT PRIMARY KEY,
		name          TEXT NOT NULL UNIQUE,
		image_id      TEXT NOT NULL REFERENCES images(id),
		state         TEXT NOT NULL,
		cpus          INTEGER NOT NULL,
		memory_mib    INTEGER NOT NULL,
		disk_bytes    INTEGER NOT NULL,
		disk_path     TEXT NOT NULL,
		disk_format   TEXT NOT NULL,
		disk_strategy TEXT NOT NULL,
		vmm           TEXT NOT NULL,
		accel_wanted  TEXT NOT NULL,
		dir           TEXT NOT NULL,
		handle        TEXT NOT NULL DEFAULT '',
		created_at    TEXT NOT NULL,
		started_at    TEXT NOT NULL DEFAULT '',
		last_error    TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX vms_image_id ON vms(image_id);`,
}

// Store is the state database.
type Store struct {
	db *sql.DB
}

// Open opens (creating if needed) the database at path and migrates it.
func Open(ctx context.Context, path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open state database %s: %w", path, err)
	}
	// One writer; SQLite serialises writes anyway and this avoids SQLITE_BUSY.
	db.SetMaxOpenConns(1)
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrate state database %s: %w", path, err)
	}
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// SchemaVersion returns the schema version.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&v)
	return v, err
}

func (s *Store) migrate(ctx context.Context) error {
	v, err := s.SchemaVersion(ctx)
	if err != nil {
		return err
	}
	if v > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this bangerd knows (%d): upgrade banger", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, i+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: set version: %w", i+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migration %d: commit: %w", i+1, err)
		}
	}
	return nil
}

// Image is a stored image.
type Image struct {
	ID         string
	Name       string
	Managed    bool
	Rootfs     string
	Kernel     string
	Initrd     string
	ModulesDir string
	SizeBytes  int64
	CreatedAt  time.Time
}

// VM is a stored VM.
type VM struct {
	ID           string
	Name         string
	ImageID      string
	State        string
	CPUs         int
	MemoryMiB    int
	DiskBytes    int64
	DiskPath     string
	DiskFormat   string
	DiskStrategy string
	VMM          string
	AccelWanted  string
	Dir          string
	Handle       string // JSON vmm.Handle while running
	ImageName    string // read only: the name of ImageID
	CreatedAt    time.Time
	StartedAt    time.Time
	LastError    string
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func parseTime(s string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, s)
	return t
}

func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

// InsertImage adds an image. A duplicate name is errdefs.ErrAlreadyExists.
func (s *Store) InsertImage(ctx context.Context, im Image) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO images (id, name, managed, rootfs, kernel, initrd, modules_dir, size_bytes, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		im.ID, im.Name, im.Managed, im.Rootfs, im.Kernel, im.Initrd, im.ModulesDir, im.SizeBytes, fmtTime(im.CreatedAt))
	if isUnique(err) {
		return fmt.Errorf("image %q: %w", im.Name, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return fmt.Errorf("insert image %q: %w", im.Name, err)
	}
	return nil
}

// UpdateImage replaces an image's fields (by id).
func (s *Store) UpdateImage(ctx context.Context, im Image) error {
	_, err := s.db.ExecContext(ctx, `UPDATE images SET name=?, managed=?, rootfs=?, kernel=?, initrd=?, modules_dir=?, size_bytes=? WHERE id=?`,
		im.Name, im.Managed, im.Rootfs, im.Kernel, im.Initrd, im.ModulesDir, im.SizeBytes, im.ID)
	if err != nil {
		return fmt.Errorf("update image %q: %w", im.Name, err)
	}
	return nil
}

const imageCols = `id, name, managed, rootfs, kernel, initrd, modules_dir, size_bytes, created_at`

func scanImage(row interface{ Scan(...any) error }) (Image, error) {
	var im Image
	var created string
	err := row.Scan(&im.ID, &im.Name, &im.Managed, &im.Rootfs, &im.Kernel, &im.Initrd, &im.ModulesDir, &im.SizeBytes, &created)
	im.CreatedAt = parseTime(created)
	return im, err
}

// GetImage finds an image by name or id.
func (s *Store) GetImage(ctx context.Context, ref string) (Image, error) {
	im, err := scanImage(s.db.QueryRowContext(ctx, `SELECT `+imageCols+` FROM images WHERE name = ? OR id = ?`, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return Image{}, fmt.Errorf("image %s: %w", errdefs.Quote(ref), errdefs.ErrNotFound)
	}
	if err != nil {
		return Image{}, fmt.Errorf("get image %s: %w", errdefs.Quote(ref), err)
	}
	return im, nil
}

// ListImages returns all images by name.
func (s *Store) ListImages(ctx context.Context) ([]Image, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+imageCols+` FROM images ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	defer rows.Close()
	var out []Image
	for rows.Next() {
		im, err := scanImage(rows)
		if err != nil {
			return nil, fmt.Errorf("list images: %w", err)
		}
		out = append(out, im)
	}
	return out, rows.Err()
}

// DeleteImage removes an image. It fails with ErrFailedPrecondition while a
// VM references it (checked in the same transaction).
func (s *Store) DeleteImage(ctx context.Context, id string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var users []string
	rows, err := tx.QueryContext(ctx, `SELECT name FROM vms WHERE image_id = ? ORDER BY name`, id)
	if err != nil {
		return fmt.Errorf("delete image: %w", err)
	}
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return err
		}
		users = append(users, n)
	}
	rows.Close()
	if len(users) > 0 {
		return fmt.Errorf("image is used by VM(s) %s: remove them first: %w", strings.Join(users, ", "), errdefs.ErrFailedPrecondition)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM images WHERE id = ?`, id); err != nil {
		return fmt.Errorf("delete image: %w", err)
	}
	return tx.Commit()
}

// ImageUsers returns the names of the VMs using an image.
func (s *Store) ImageUsers(ctx context.Context, id string) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name FROM vms WHERE image_id = ? ORDER BY name`, id)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}

const vmCols = `id, name, image_id, state, cpus, memory_mib, disk_bytes, disk_path, disk_format, disk_strategy, vmm, accel_wanted, dir, handle, created_at, started_at, last_error`

// vmSelect reads a VM with its image's name.
const vmSelect = `SELECT ` + vmCols + `, (SELECT name FROM images WHERE images.id = vms.image_id) FROM vms`

func scanVM(row interface{ Scan(...any) error }) (VM, error) {
	var v VM
	var created, started string
	var imageName sql.NullString
	err := row.Scan(&v.ID, &v.Name, &v.ImageID, &v.State, &v.CPUs, &v.MemoryMiB, &v.DiskBytes, &v.DiskPath, &v.DiskFormat, &v.DiskStrategy,
		&v.VMM, &v.AccelWanted, &v.Dir, &v.Handle, &created, &started, &v.LastError, &imageName)
	v.ImageName = imageName.String
	v.CreatedAt = parseTime(created)
	v.StartedAt = parseTime(started)
	return v, err
}

// InsertVM adds a VM. A duplicate name is errdefs.ErrAlreadyExists.
func (s *Store) InsertVM(ctx context.Context, v VM) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO vms (`+vmCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		v.ID, v.Name, v.ImageID, v.State, v.CPUs, v.MemoryMiB, v.DiskBytes, v.DiskPath, v.DiskFormat, v.DiskStrategy,
		v.VMM, v.AccelWanted, v.Dir, v.Handle, fmtTime(v.CreatedAt), fmtTime(v.StartedAt), v.LastError)
	if isUnique(err) {
		return fmt.Errorf("vm %q: %w", v.Name, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return fmt.Errorf("insert vm %q: %w", v.Name, err)
	}
	return nil
}

// UpdateVM writes a VM's mutable fields (by id).
func (s *Store) UpdateVM(ctx context.Context, v VM) error {
	_, err := s.db.ExecContext(ctx, `UPDATE vms SET state=?, handle=?, started_at=?, last_error=? WHERE id=?`,
		v.State, v.Handle, fmtTime(v.StartedAt), v.LastError, v.ID)
	if err != nil {
		return fmt.Errorf("update vm %q: %w", v.Name, err)
	}
	return nil
}

// GetVM finds a VM by id or name; an id wins over a name (a VM made
// before names were checked against ids may carry another's id as name).
func (s *Store) GetVM(ctx context.Context, ref string) (VM, error) {
	v, err := scanVM(s.db.QueryRowContext(ctx, vmSelect+` WHERE name = ? OR id = ? ORDER BY id = ? DESC LIMIT 1`, ref, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return VM{}, fmt.Errorf("vm %s: %w", errdefs.Quote(ref), errdefs.ErrNotFound)
	}
	if err != nil {
		return VM{}, fmt.Errorf("get vm %s: %w", errdefs.Quote(ref), err)
	}
	return v, nil
}

// ListVMs returns all VMs by name.
func (s *Store) ListVMs(ctx context.Context) ([]VM, error) {
	rows, err := s.db.QueryContext(ctx, vmSelect+` ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	defer rows.Close()
	var out []VM
	for rows.Next() {
		v, err := scanVM(rows)
		if err != nil {
			return nil, fmt.Errorf("list vms: %w", err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// VMNameTaken reports whether a VM has that name, or that id: a name
// equal to another VM's id would make lookups ambiguous.
func (s *Store) VMNameTaken(ctx context.Context, name string) (bool, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM vms WHERE name = ? OR id = ?`, name, name).Scan(&n); err != nil {
		return false, fmt.Errorf("check vm name %s: %w", errdefs.Quote(name), err)
	}
	return n > 0, nil
}

// MarkStopped records a VM as stopped, without handle, if its row still
// records handle (compared as stored): a monitor of an old boot never
// marks a newer boot stopped. It reports whether the row changed.
func (s *Store) MarkStopped(ctx context.Context, id, handle string) (bool, error) {
	res, err := s.db.ExecContext(ctx, `UPDATE vms SET state = 'stopped', handle = '' WHERE id = ? AND handle = ?`, id, handle)
	if err != nil {
		return false, fmt.Errorf("mark vm %s stopped: %w", id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("mark vm %s stopped: %w", id, err)
	}
	return n > 0, nil
}

// DeleteVM removes a VM row.
func (s *Store) DeleteVM(ctx context.Context, id string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM vms WHERE id = ?`, id); err != nil {
		return fmt.Errorf("delete vm: %w", err)
	}
	return nil
}
