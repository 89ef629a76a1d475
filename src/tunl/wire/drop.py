"""Why a packet was dropped. The data plane counts drops by these reasons."""
import enum


class Drop(enum.Enum):
    MALFORMED = "malformed"          # too short, or not the IP version it claims to be
    BAD_HLEN = "bad_header_length"   # IHL < 5 or past the end of the packet
    BAD_CHECKSUM = "bad_checksum"    # IPv4 header checksum does not verify
    BAD_LENGTH = "bad_total_length"  # total length smaller than the header or past the end
    NOT_IPV4 = "not_ipv4"            # an inner packet this mode cannot carry (ipip: not IPv4)
    NOT_IPV6 = "not_ipv6"            # sit carries IPv6 only
    WRONG_PROTO = "wrong_protocol"   # outer protocol is not this mode's, or a GRE type it does not carry
    ECN = "ecn"                      # RFC 6040: outer CE over a not-ECT inner packet
    NO_TUNNEL = "no_tunnel"          # no tunnel matches the outer addresses
    NO_ROUTE = "no_route"            # no outer destination for an NBMA tunnel
    DEAD_LOOP = "dead_loop"          # the outer destination is routed into the tunnel itself
    TOO_BIG = "too_big"              # larger than the path MTU with DF: ICMP sent back
    GRE_FLAGS = "gre_flags"          # GRE version or routing bits set
    BAD_CSUM = "bad_gre_checksum"    # a GRE checksum that does not verify
    CSUM_MISMATCH = "csum_mismatch"  # a checksum present but not configured, or the reverse
    KEY_MISMATCH = "key_mismatch"    # a key that no tunnel has
    OUT_OF_SEQ = "out_of_sequence"   # iseq: a missing or older sequence number
    ISATAP_SOURCE = "isatap_source"  # an ISATAP packet from a router not in the list
    SIXRD_SOURCE = "6rd_source"      # a 6rd packet whose inner source does not match its outer
    NOT_MEMBER = "not_member"        # an outer source not in the tunnel's member set
    PACKET_TOO_BIG = "packet_too_big"  # IPv6 larger than the tunnel MTU: ICMPv6 sent back
    INTERNAL = "internal_error"      # a bug in tunl: logged, counted, the data plane goes on
    SEND_FAILED = "send_failed"      # the underlay refused the packet
    TUNNEL_DOWN = "tunnel_down"      # the device is not up
    # ESP (RFC 4303) and the xfrm layer of a vti. tunnel.esp.XFRM_MIB names the kernel's
    # counter (/proc/net/xfrm_stat) that each one is counted in.
    ESP_HEADER = "esp_header"        # too short for SPI and sequence number
    ESP_TOO_OLD = "esp_too_old"      # left of the anti-replay window (or sequence number 0)
    ESP_REPLAY = "esp_replay"        # a sequence number already received in the window
    ESP_LENGTH = "esp_length"        # too short for IV and ICV, or not whole cipher blocks
    ESP_ICV = "esp_icv"              # the integrity check value does not verify
    ESP_PADDING = "esp_padding"      # pad length past the payload, or pad bytes not 1, 2, 3 ...
    ESP_NEXT_HEADER = "esp_next_header"  # not IPv4 (4) after the trailer, or no IPv4 header
    ESP_SEQ_OVERFLOW = "esp_seq_overflow"  # the outbound sequence number would cycle
    XFRM_NO_STATE = "xfrm_no_state"  # no SA for the SPI (and destination, mark)
    XFRM_NO_POLICY = "xfrm_no_policy"  # a decrypted packet no in policy allows
    XFRM_TMPL_MISMATCH = "xfrm_tmpl_mismatch"  # the policy's template names another SA
    XFRM_OUT_NO_POLICY = "xfrm_out_no_policy"  # no out policy for the packet
    XFRM_OUT_NO_STATE = "xfrm_out_no_state"  # an out policy whose template no SA fits
