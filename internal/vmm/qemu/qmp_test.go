package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// fakeQMP serves one QMP client on a unix socket. handle answers each
// command (already past the greeting) with the lines to send back.
func fakeQMP(t *testing.T, greet bool, handle func(cmd string, id json.RawMessage) []string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		if !greet {
			time.Sleep(5 * time.Second)
			return
		}
		fmt.Fprintln(conn, `{"QMP": {"version": {"qemu": {"micro": 19, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}`)
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
				return
			}
			for _, l := range handle(req.Execute, req.ID) {
				fmt.Fprintln(conn, l)
			}
		}
	}()
	return path
}

func TestQMPExecute(t *testing.T) {
	path := fakeQMP(t, true, func(cmd string, id json.RawMessage) []string {
		switch cmd {
		case "qmp_capabilities":
			return []string{`{"return": {}, "id": ` + string(id) + `}`}
		case "query-status":
			return []string{
				`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RTC_CHANGE", "data": {"offset": 0}}`,
				`{"return": {}, "id": "stale-1"}`,
				`{"return": {"status": "running", "singlestep": false, "running": true}, "id": ` + string(id) + `}`,
			}
		default:
			return []string{`{"error": {"class": "CommandNotFound", "desc": "The command ` + cmd + ` has not been found"}, "id": ` + string(id) + `}`}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := DialQMP(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if q.Version.Major != 7 || q.Version.Minor != 2 || q.Version.Micro != 19 {
		t.Errorf("version %+v", q.Version)
	}
	st, err := q.QueryStatus(ctx)
	if err != nil || st != "running" {
		t.Fatalf("QueryStatus = %q, %v", st, err)
	}
	if ev := q.Events(); len(ev) != 1 {
		t.Errorf("events = %d, want 1", len(ev))
	}
	err = q.Execute(ctx, "bogus", nil, nil)
	var qe *QMPError
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("Execute(bogus) = %v, want CommandNotFound", err)
	}
}

func TestQMPSilentServerBoundedByContext(t *testing.T) {
	path := fakeQMP(t, false, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := DialQMP(ctx, path)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("DialQMP = %v, want deadline exceeded", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("took %v", el)
	}
}

func TestQMPCancel(t *testing.T) {
	path := fakeQMP(t, false, nil)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err := DialQMP(ctx, path)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("DialQMP = %v, want canceled", err)
	}
}
