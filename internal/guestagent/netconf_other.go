//go:build !linux

package guestagent

import "github.com/bangerdev/banger/internal/agentproto"

func networkState(nc *agentproto.NetworkConfig, initErr string) *agentproto.NetworkState {
	if nc == nil {
		return nil
	}
	return &agentproto.NetworkState{Error: "network configuration needs Linux"}
}
