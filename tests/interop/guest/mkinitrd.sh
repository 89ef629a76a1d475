#!/bin/sh
# Build the guest's busybox initramfs with the tunnel, virtio and 9p modules of a Debian kernel.
# usage: mkinitrd.sh KROOT KVER OUT.cpio
#   KROOT: where the linux-image .deb was extracted (dpkg-deb -x), after depmod -b KROOT KVER
set -eu
KROOT=$1; KVER=$2; OUT=$3
HERE=$(cd "$(dirname "$0")" && pwd)
MODS="ipip ip_gre gre sit ip_vti tunnel4 ip_tunnel xfrm4_tunnel esp4 xfrm_user veth bridge
      virtio_pci virtio_net virtio_console 9p 9pnet_virtio
      nf_tables nft_objref
      gcm ghash_generic ctr seqiv echainiv authenc cbc hmac jitterentropy_rng drbg"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/bin "$W"/sbin "$W"/proc "$W"/sys "$W"/dev "$W"/tmp "$W"/host "$W"/lib/modules/"$KVER"
cp /bin/busybox "$W"/bin/busybox                       # from busybox-static
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$W/bin/$a"; done
for a in modprobe insmod rmmod lsmod depmod; do ln -sf ../bin/busybox "$W/sbin/$a"; done
MD=$KROOT/lib/modules/$KVER
for m in $MODS; do
  # --show-depends takes one module at a time
  modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}' |
  while read -r f; do
    rel=${f#"$MD"/}
    mkdir -p "$W/lib/modules/$KVER/$(dirname "$rel")"
    cp -n "$f" "$W/lib/modules/$KVER/$rel"
  done
done
cp "$MD"/modules.builtin "$MD"/modules.builtin.modinfo "$MD"/modules.order "$W/lib/modules/$KVER/"
depmod -b "$W" "$KVER"
cp "$HERE"/init "$W"/init
chmod 755 "$W"/init
(cd "$W" && find . | cpio -o -H newc --quiet) > "$OUT"
